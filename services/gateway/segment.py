"""Segment's HTTP tracking API as IngestService requests: body decoding and translation, no I/O.

The gateway checks only what makes a whole request unusable (a body that is not a JSON object,
a batch that is not an array, a bad batch-level context/integrations/sentAt, too many messages)
and, per message of a batch, that it is an object of a known type and not over 32 KB. Every
other rule (the JSON type of each field, userId or anonymousId, track's event, junk ids,
messageId length...) is ingest's job, so that every gateway and gRPC client gets the same rules
and each message is checked once.

The hot path is `translate()`: messages travel to ingest in the lean form of
WriteEventsRequest.messages_json, one orjson.dumps per message with the batch-level context,
integrations and sentAt merged in; no protobuf Event is built, and ingest parses each message
once. Ingest answers only the exceptions (omit_accepted_results).
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

    The messages are built in place inside the request (messages_json). `indices[i]` is the
    position in the client's batch of the request's message i, so that ingest's results can
    be reported against that batch.
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
    def messages(self) -> Sequence[bytes]:
        """The messages sent to ingest, as Segment JSON objects."""
        return self.request.messages_json


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


def parse_timestamp(value: Any, field: str) -> datetime:
    """An ISO-8601 string ('Z' or an offset, any fraction digits); no offset means UTC."""
    if type(value) is not str:
        raise _Invalid(field, "INVALID_TYPE", f"{field} must be an ISO-8601 string, got {_kind(value)}")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid(
            field, "INVALID_TIMESTAMP", f"{field} is not an ISO-8601 date-time: {value[:64]!r}"
        ) from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _object(value: Any, field: str) -> dict[str, Any]:
    if type(value) is dict:
        return value
    raise _Invalid(field, "INVALID_TYPE", f"{field} must be a JSON object, got {_kind(value)}")


def _message_id(msg: Any) -> str:
    value = msg.get("messageId") if type(msg) is dict else None
    return value if type(value) is str else ""


def _new_request() -> ingest_service_pb2.WriteEventsRequest:
    return ingest_service_pb2.WriteEventsRequest(omit_accepted_results=True)


def translate_single(body: dict[str, Any], type_name: str, body_size: int) -> Translation:
    """The body of /v1/{identify,track,...} (or a pixel's payload): one message of `type_name`."""
    if body_size > MAX_MESSAGE_BYTES:
        raise RequestError(
            "message_too_large", f"the message is {body_size} bytes; the limit is {MAX_MESSAGE_BYTES}"
        )
    key = body.get("writeKey")
    write_key = key if type(key) is str else ""
    body["type"] = type_name  # the route wins over a "type" in the body
    request = _new_request()
    request.messages_json.append(orjson.dumps(body))
    return Translation(request, [0], [], write_key, 1)


@dataclass(slots=True)
class _BatchDefaults:
    """A batch's top-level context, integrations and sentAt, which apply to each message."""

    context: dict[str, Any] | None = None
    integrations: dict[str, Any] | None = None
    sent_at: str | None = None


def _batch_defaults(body: dict[str, Any]) -> _BatchDefaults:
    # A bad top-level field would spoil every message, so it refuses the whole request.
    defaults = _BatchDefaults()
    try:
        value = body.get("context")
        if value is not None and _object(value, "context"):
            defaults.context = value
        value = body.get("integrations")
        if value is not None and _object(value, "integrations"):
            defaults.integrations = value
        value = body.get("sentAt")
        if value is not None:
            parse_timestamp(value, "sentAt")
            defaults.sent_at = value
    except _Invalid as bad:
        raise RequestError("invalid_body", f"{bad.description} (top level of the batch)") from None
    return defaults


def _merge_defaults(msg: dict[str, Any], defaults: _BatchDefaults) -> None:
    """Lays the batch's context, integrations and sentAt under the message's own: top-level
    keys of the message's context and integrations win. A value of the wrong JSON type is left
    for ingest to reject with its field."""
    if defaults.context is not None:
        context = msg.get("context")
        if context is None:
            msg["context"] = defaults.context
        elif type(context) is dict:
            msg["context"] = {**defaults.context, **context}
    if defaults.integrations is not None:
        integrations = msg.get("integrations")
        if integrations is None:
            msg["integrations"] = defaults.integrations
        elif type(integrations) is dict:
            msg["integrations"] = {**defaults.integrations, **integrations}
    if defaults.sent_at is not None and msg.get("sentAt") is None:
        msg["sentAt"] = defaults.sent_at


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
    merge = defaults.context is not None or defaults.integrations is not None or defaults.sent_at is not None
    # No message can be over the limit when the whole body is not: skip measuring then.
    measure = body_size > MAX_MESSAGE_BYTES
    request = _new_request()
    messages: list[bytes] = []
    indices: list[int] = []
    errors: list[MessageError] = []
    dumps = orjson.dumps
    for index, msg in enumerate(batch):
        if type(msg) is not dict:
            errors.append(
                MessageError(
                    index, "", "message", "INVALID_TYPE", f"a message must be a JSON object, got {_kind(msg)}"
                )
            )
            continue
        type_name = msg.get("type")
        if type(type_name) is not str or type_name not in EVENT_TYPES:
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
        if merge:
            _merge_defaults(msg, defaults)
        data = dumps(msg)
        if measure and len(data) > MAX_MESSAGE_BYTES:
            errors.append(
                MessageError(
                    index,
                    _message_id(msg),
                    "message",
                    "TOO_LARGE",
                    f"the message is {len(data)} bytes; the limit is {MAX_MESSAGE_BYTES}",
                )
            )
            continue
        messages.append(data)
        indices.append(index)
    request.messages_json.extend(messages)
    return Translation(request, indices, errors, write_key, len(batch))


def translate(body: dict[str, Any], route: str, body_size: int) -> Translation:
    """The ingest request for a request to /v1/{route}; `body_size` is the decompressed body's length."""
    if route in BATCH_ROUTES:
        return translate_batch(body, body_size)
    return translate_single(body, SINGLE_ROUTES[route], body_size)


_REJECTED = ingest_service_pb2.OUTCOME_REJECTED
_ACCEPTED = ingest_service_pb2.OUTCOME_ACCEPTED
_DUPLICATE = ingest_service_pb2.OUTCOME_DUPLICATE
_SUPPRESSED = ingest_service_pb2.OUTCOME_SUPPRESSED


def merge_results(translation: Translation, response: ingest_service_pb2.WriteEventsResponse) -> Outcome:
    """Ingest's answer joined with the translation errors, indexed as the client's batch.

    Ingest lists only the messages it did not accept (omit_accepted_results); every message
    must be accounted for, as accepted or in a result, or this raises: never report success
    for messages ingest did not account for."""
    results = response.results
    count = len(translation.messages)
    indices = translation.indices
    if response.accepted + len(results) != count:
        raise RuntimeError(
            f"ingest accounted for {response.accepted} accepted and {len(results)} other results "
            f"of {count} messages"
        )
    duplicates = suppressed = 0
    errors = list(translation.errors)
    for result in results:
        position = result.index
        if not 0 <= position < count:
            raise RuntimeError(f"ingest answered for message {position} of {count}")
        outcome = result.outcome
        if outcome == _DUPLICATE:
            duplicates += 1
        elif outcome == _SUPPRESSED:
            suppressed += 1
        elif outcome == _ACCEPTED:
            raise RuntimeError("ingest listed an accepted message among the exceptions")
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
    return Outcome(response.accepted, duplicates, suppressed, errors)
