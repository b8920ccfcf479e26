"""Pure ingest logic: validation, normalisation and the stored row of one message.

No I/O here: the servicer calls `prepare()` for each message of a batch and hands the rows to the
writer. Field names in violations are Segment's JSON names, so a gateway can pass them on as is.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import unquote_plus

import orjson

from touchpoint.events.v1 import event_pb2
from touchpoint.ingest.v1 import ingest_service_pb2 as pb

MAX_MESSAGE_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 500 * 1024
MAX_BATCH_MESSAGES = 2500
MAX_MESSAGE_ID_CHARS = 100

EVENT_TYPES = {1: "identify", 2: "track", 3: "page", 4: "screen", 5: "group", 6: "alias"}
TYPE_NUMBERS = {name: num for num, name in EVENT_TYPES.items()}

# Values that clients send when they have no real id (stringified undefined, placeholders):
# never usable as an identity. Compared case-insensitively after trimming.
JUNK_IDS = frozenset(
    {
        "",
        "0",
        "-1",
        "null",
        "none",
        "nil",
        "undefined",
        "anonymous",
        "guest",
        "unknown",
        "n/a",
        "na",
        "nan",
        "[object object]",
        "00000000-0000-0000-0000-000000000000",
        "true",
        "false",
    }
)

CAMPAIGN_KEYS = {"utm_campaign": "name", "utm_source": "source", "utm_medium": "medium",
                 "utm_content": "content", "utm_term": "term"}  # fmt: skip
CAMPAIGN_FIELDS = ("name", "source", "medium", "content", "term")

# URL parameter -> ad network.
CLICK_ID_NETWORKS = {
    "gclid": "google",
    "gbraid": "google",
    "wbraid": "google",
    "dclid": "doubleclick",
    "fbclid": "meta",
    "msclkid": "microsoft",
    "ttclid": "tiktok",
    "li_fat_id": "linkedin",
    "twclid": "x",
}

# Rows carry instants and JSON in the binary forms Postgres takes them in, so that the writer's
# COPY copies them without a Python call per value (store.use_row_codecs): an instant is
# (microseconds since 2000-01-01 UTC,), Postgres's epoch, and a JSON object is its UTF-8 bytes
# after jsonb's version byte 1. Measured: half the encoding cost of datetimes and plain bytes.
PgTime = tuple[int]
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_UNIX_SECONDS = 946_684_800
# The instants a datetime can hold (years 1 to 9999), which Postgres can hold too.
_MIN_US = (datetime(1, 1, 1, tzinfo=UTC) - _PG_EPOCH) // timedelta(microseconds=1)
_MAX_US = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - _PG_EPOCH) // timedelta(microseconds=1)
JSONB = b"\x01"


def pg_time(dt: datetime) -> PgTime:
    """An aware datetime in the rows' form of an instant."""
    d = dt - _PG_EPOCH
    return ((d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds,)


def from_pg_time(t: PgTime) -> datetime:
    return _PG_EPOCH + timedelta(microseconds=t[0])


_last_received: tuple[datetime | None, PgTime] = (None, (0,))


def _received(received_at: datetime) -> PgTime:
    # One request's messages share their received_at: convert it once.
    global _last_received
    if _last_received[0] is not received_at:
        _last_received = (received_at, pg_time(received_at))
    return _last_received[1]


_WS_RE = re.compile(r"\s+")


def is_junk_id(value: str) -> bool:
    """True for ids that must never link anything (PRODUCT.md's junk values)."""
    return value.strip().lower() in JUNK_IDS


@dataclass(frozen=True, slots=True)
class Source:
    id: str
    space_id: str
    enabled: bool


@dataclass(slots=True)
class Prepared:
    """A valid message, ready to store. `row` matches store.EVENT_COLUMNS, with instants as
    PgTime and JSON objects as jsonb bytes (see PgTime)."""

    message_id: str
    row: tuple[Any, ...]
    # The identifiers a suppression can match (only collected when the space has suppressions).
    identifiers: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Rejected:
    """A message that is not stored: its message id as sent ("" when none) and what is wrong."""

    message_id: str
    violations: list[pb.FieldViolation]


def normalise_email(value: str) -> str:
    return value.strip().lower()


def _identifiers(
    user_id: str | None,
    anonymous_id: str | None,
    previous_id: str | None,
    traits: dict[str, Any] | None,
    context: dict[str, Any],
) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for kind, value in (("user_id", user_id), ("anonymous_id", anonymous_id), ("user_id", previous_id)):
        if value:
            out.append((kind, value))
        if kind == "user_id" and value:
            out.append(("anonymous_id", value))  # an alias previousId may be either kind
    ctx_traits = context.get("traits")
    for t in (traits, ctx_traits if isinstance(ctx_traits, dict) else None):
        if t and isinstance(t.get("email"), str) and t["email"].strip():
            out.append(("email", normalise_email(t["email"])))
    device = context.get("device")
    if isinstance(device, dict):
        for key, kind in (("id", "device_id"), ("advertisingId", "advertising_id")):
            if isinstance(device.get(key), str) and device[key].strip():
                out.append((kind, device[key].strip()))
    return tuple(out)


def _violation(field: str, reason: str, description: str) -> pb.FieldViolation:
    return pb.FieldViolation(field=field, reason=reason, description=description)


def _ts(msg: event_pb2.Event, field: str) -> PgTime | None:
    """A Timestamp field, to the microsecond; None when unset or outside years 1 to 9999."""
    if not msg.HasField(field):  # type: ignore[arg-type]
        return None
    t = getattr(msg, field)
    us = (t.seconds - _PG_EPOCH_UNIX_SECONDS) * 1_000_000 + t.nanos // 1000
    return (us,) if _MIN_US <= us <= _MAX_US else None


def _json_object(raw: bytes, field: str, out: list[pb.FieldViolation]) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        out.append(_violation(field, "INVALID_JSON", f"{field} is not valid JSON"))
        return None
    if not isinstance(value, dict):
        out.append(_violation(field, "NOT_AN_OBJECT", f"{field} must be a JSON object"))
        return None
    return value


def parse_campaign(url: str, search: str = "") -> tuple[dict[str, Any], list[dict[str, str]]]:
    """UTM parameters and ad click ids of a landing URL (and/or its ?search part).

    utm_campaign/source/medium/content/term become name/source/medium/content/term; any other
    utm_x is kept as x. Click ids come with their network. The first value of a parameter wins.
    Returns fresh objects the caller may change.
    """
    campaign, clicks = _parse_campaign_cached(url, search)
    return dict(campaign), [dict(c) for c in clicks]


@lru_cache(maxsize=8192)
def _parse_campaign_cached(url: str, search: str) -> tuple[dict[str, str], tuple[dict[str, str], ...]]:
    # Landing URLs repeat (one per ad, page or email link), so parsing is cached; most URLs
    # carry neither UTM parameters nor click ids and leave at the first test.
    query = url.partition("?")[2].partition("#")[0] if url else ""
    if search:
        query = (query + "&" + search.lstrip("?")) if query else search.lstrip("?")
    campaign: dict[str, str] = {}
    clicks: list[dict[str, str]] = []
    if not query or "=" not in query:
        return campaign, ()
    seen_clicks: set[str] = set()
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq:
            continue
        k = key.lower()
        is_utm = k.startswith("utm_")
        if not is_utm and k not in CLICK_ID_NETWORKS:
            continue
        value = unquote_plus(value).strip()
        if not value:
            continue
        if is_utm:
            name = CAMPAIGN_KEYS.get(k, k[4:])
            if name and name not in campaign:
                campaign[name] = value
        elif k not in seen_clicks:
            seen_clicks.add(k)
            clicks.append({"kind": k, "network": CLICK_ID_NETWORKS[k], "value": value})
    return campaign, tuple(clicks)


def _usable(value: str) -> str | None:
    value = value.strip()
    return None if not value or is_junk_id(value) else value


def _check_ids(
    type_name: str | None,
    raw_user: str,
    raw_anon: str,
    raw_previous: str,
    raw_group: str,
    raw_event: str,
    bad: list[pb.FieldViolation],
) -> tuple[str | None, str | None, str | None, str | None, str | None]:
    """The usable user, anonymous, previous and group ids and the event name of a message;
    what is missing or junk goes to `bad`."""
    user_id = _usable(raw_user) if raw_user else None
    anonymous_id = _usable(raw_anon) if raw_anon else None
    if user_id is None and anonymous_id is None:
        if raw_user.strip() or raw_anon.strip():
            junk = raw_user if raw_user.strip() else raw_anon
            field = "userId" if raw_user.strip() else "anonymousId"
            bad.append(
                _violation(
                    field,
                    "JUNK_ID",
                    f"{junk!r} is a placeholder, not an id; send a real userId or anonymousId",
                )
            )
        else:
            bad.append(_violation("userId", "REQUIRED", "userId or anonymousId is required"))

    previous_id = group_id = event_name = None
    if type_name == "track":
        event_name = raw_event.strip() or None
        if event_name is None:
            bad.append(_violation("event", "REQUIRED", "track needs an event name"))
    elif type_name == "alias":
        previous_id = _usable(raw_previous)
        if previous_id is None:
            reason = "JUNK_ID" if raw_previous.strip() else "REQUIRED"
            bad.append(_violation("previousId", reason, "alias needs a real previousId"))
        if user_id is None:
            reason = "JUNK_ID" if raw_user.strip() else "REQUIRED"
            bad.append(_violation("userId", reason, "alias needs a real userId"))
    elif type_name == "group":
        group_id = _usable(raw_group)
        if group_id is None:
            reason = "JUNK_ID" if raw_group.strip() else "REQUIRED"
            bad.append(_violation("groupId", reason, "group needs a real groupId"))
    return user_id, anonymous_id, previous_id, group_id, event_name


def _page_campaign(context: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The campaign and click ids of context.page (fresh objects), before explicit values."""
    page = context.get("page")
    if type(page) is dict and (page.get("url") or page.get("search")):
        u, q = page.get("url"), page.get("search")
        return parse_campaign(u if type(u) is str else "", q if type(q) is str else "")
    return {}, []


def _explicit_campaign(context: dict[str, Any], campaign: dict[str, Any]) -> bool:
    """Lays context.campaign (explicit values win) over `campaign`; True when context.campaign
    must be replaced by the result."""
    explicit = context.get("campaign")
    if type(explicit) is dict:
        for key, value in explicit.items():
            if isinstance(value, str | int | float) and str(value).strip():
                campaign[key] = str(value).strip()
    return bool(campaign) and explicit != campaign


def _event_time(original: PgTime | None, sent_at: PgTime | None, received_at: PgTime) -> PgTime:
    if original is not None and sent_at is not None:
        us = received_at[0] - (sent_at[0] - original[0])
        # Device clocks at opposite ends of the calendar: keep the device's time.
        return (us,) if _MIN_US <= us <= _MAX_US else original
    return original or received_at


def prepare(
    msg: event_pb2.Event,
    *,
    source: Source,
    received_at: datetime,
    client_ip: str,
    collect_identifiers: bool = False,
    check_size: bool = True,
) -> Prepared | list[pb.FieldViolation]:
    """Validates and normalises one message: the row to store, or what is wrong with it.

    This runs once per event on the hot path: every field is read once into a local, and the
    common case (a valid message) does no more work than it must. `check_size` may be False
    when the whole request is within a message's limit.
    """
    type_name = EVENT_TYPES.get(msg.type)
    message_id = msg.message_id
    raw_user, raw_anon, raw_event, raw_name = msg.user_id, msg.anonymous_id, msg.event, msg.name
    raw_previous, raw_group = msg.previous_id, msg.group_id
    raw_props, raw_traits, raw_ctx, raw_integ = (
        msg.properties_json,
        msg.traits_json,
        msg.context_json,
        msg.integrations_json,
    )
    bad: list[pb.FieldViolation] = []
    if type_name is None:
        bad.append(
            _violation("type", "INVALID_TYPE", "type must be identify, track, page, screen, group or alias")
        )
    if message_id:
        message_id = message_id.strip()
    if not message_id:
        message_id = str(uuid.uuid4())
    elif len(message_id) > MAX_MESSAGE_ID_CHARS:
        bad.append(
            _violation("messageId", "TOO_LONG", f"messageId is longer than {MAX_MESSAGE_ID_CHARS} characters")
        )
    if "\x00" in message_id:
        bad.append(_violation("messageId", "NUL_CHARACTER", "messageId contains a NUL character"))
    if check_size and msg.ByteSize() > MAX_MESSAGE_BYTES:
        bad.append(
            _violation("message", "TOO_LARGE", f"the message is larger than {MAX_MESSAGE_BYTES} bytes")
        )
        return bad
    # Postgres text and jsonb cannot hold NUL: refuse it here rather than fail a whole commit.
    # (A raw NUL byte is invalid JSON anyway, so only the escape needs looking for.)
    if "\x00" in f"{raw_user}{raw_anon}{raw_previous}{raw_group}{raw_event}{raw_name}":
        for field, value in (("userId", raw_user), ("anonymousId", raw_anon), ("previousId", raw_previous),
                             ("groupId", raw_group), ("event", raw_event), ("name", raw_name)):  # fmt: skip
            if "\x00" in value:
                bad.append(_violation(field, "NUL_CHARACTER", f"{field} contains a NUL character"))
    for field, raw in (("properties", raw_props), ("traits", raw_traits), ("context", raw_ctx),
                       ("integrations", raw_integ)):  # fmt: skip
        if raw and b"\\" in raw and b"\\u0000" in raw:
            bad.append(_violation(field, "NUL_CHARACTER", f"{field} contains a NUL character (\\u0000)"))
    if bad:
        return bad

    user_id, anonymous_id, previous_id, group_id, event_name = _check_ids(
        type_name, raw_user, raw_anon, raw_previous, raw_group, raw_event, bad
    )

    # Validated only: properties and integrations are stored as the bytes received.
    if raw_props:
        _json_object(raw_props, "properties", bad)
    traits = _json_object(raw_traits, "traits", bad) if raw_traits else None
    context = _json_object(raw_ctx, "context", bad) if raw_ctx else None
    if raw_integ:
        _json_object(raw_integ, "integrations", bad)
    if bad:
        return bad

    context_changed = False
    if context is None:
        context = {}
    # Typed mirrors sent by gRPC clients fill what context lacks: context stays the one truth.
    ip, ua, purl, ref = msg.ip, msg.user_agent, msg.page_url, msg.referrer
    dev, adv, tok = msg.device_id, msg.advertising_id, msg.device_token
    if ip or ua or purl or ref or dev or adv or tok:
        for typed, path in (
            (ip, ("ip",)),
            (ua, ("userAgent",)),
            (purl, ("page", "url")),
            (ref, ("page", "referrer")),
            (dev, ("device", "id")),
            (adv, ("device", "advertisingId")),
            (tok, ("device", "token")),
        ):
            if typed:
                context_changed |= _set_default(context, path, typed)
    if client_ip and not context.get("ip"):
        context["ip"] = client_ip
        context_changed = True

    campaign, clicks = _page_campaign(context)
    replace = _explicit_campaign(context, campaign)
    if msg.HasField("campaign"):
        for key in CAMPAIGN_FIELDS:
            value = getattr(msg.campaign, key)
            if value:
                campaign[key] = value
        campaign.update(msg.campaign.extra)
        replace = bool(campaign) and context.get("campaign") != campaign
    if replace:
        context["campaign"] = campaign
        context_changed = True
    if len(msg.click_ids):
        for c in msg.click_ids:
            if c.value and all(x["kind"] != c.kind for x in clicks):
                clicks.append(
                    {
                        "kind": c.kind,
                        "network": c.network or CLICK_ID_NETWORKS.get(c.kind, ""),
                        "value": c.value,
                    }
                )

    original = _ts(msg, "original_timestamp") or _ts(msg, "timestamp")
    sent_at = _ts(msg, "sent_at")
    received = _received(received_at)
    raw_ctx = orjson.dumps(context) if context_changed else raw_ctx
    row = (
        source.space_id,
        source.id,
        message_id,
        type_name,
        user_id,
        anonymous_id,
        previous_id,
        group_id,
        event_name,
        raw_name.strip() or None,
        _event_time(original, sent_at, received),
        original,
        sent_at,
        received,
        JSONB + raw_props if raw_props else None,
        JSONB + raw_traits if raw_traits else None,
        JSONB + raw_ctx if raw_ctx else None,
        JSONB + raw_integ if raw_integ else None,
        JSONB + orjson.dumps(campaign) if campaign else None,
        JSONB + orjson.dumps(clicks) if clicks else None,
    )
    idents = _identifiers(user_id, anonymous_id, previous_id, traits, context) if collect_identifiers else ()
    return Prepared(message_id, row, idents)


# -- the lean form: one Segment JSON message ---------------------------------------------


class _Invalid(Exception):
    """A JSON type that cannot be carried (raised at the first bad field, like the gateway)."""

    def __init__(self, field: str, reason: str, description: str) -> None:
        super().__init__(description)
        self.violation = _violation(field, reason, description)


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


def _json_id(value: Any, field: str) -> str:
    # Segment clients send numeric ids as JSON numbers (analytics-python's stringify_id
    # accepts ints); they mean the same id as its decimal string.
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(field, "INVALID_TYPE", f"{field} must be a string or a number, got {_kind(value)}")
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # 42.0 is the id 42, as JavaScript would print it
    return str(value)


def _json_str(value: Any, field: str) -> str:
    if type(value) is str:
        return value
    if value is None:
        return ""
    raise _Invalid(field, "INVALID_TYPE", f"{field} must be a string, got {_kind(value)}")


def _json_obj(value: Any, field: str) -> dict[str, Any] | None:
    if value is None or type(value) is dict:
        return value
    raise _Invalid(field, "INVALID_TYPE", f"{field} must be a JSON object, got {_kind(value)}")


def parse_time(value: Any, field: str, cache: dict[str, PgTime | None] | None = None) -> PgTime | None:
    """An ISO-8601 string ('Z' or an offset, any fraction digits, kept to the microsecond as
    Postgres stores it) as a PgTime; no offset means UTC. None for an instant outside years 1
    to 9999 in UTC. `cache` remembers strings already parsed (a batch's sentAt repeats in every
    message)."""
    if type(value) is not str:
        raise _Invalid(field, "INVALID_TYPE", f"{field} must be an ISO-8601 string, got {_kind(value)}")
    if cache is not None and value in cache:
        return cache[value]
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid(
            field, "INVALID_TIMESTAMP", f"{field} is not an ISO-8601 date-time: {value[:64]!r}"
        ) from None
    t: PgTime | None = pg_time(dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC))
    if t is not None and not _MIN_US <= t[0] <= _MAX_US:
        t = None
    if cache is not None and len(cache) < 1000:
        cache[value] = t
    return t


_NUL_ESCAPE = b"\\u0000"
_JSON_TEXT_FIELDS = ("userId", "anonymousId", "previousId", "groupId", "event", "name")


def prepare_json(
    raw: bytes,
    *,
    source: Source,
    received_at: datetime,
    client_ip: str,
    collect_identifiers: bool = False,
    times: dict[str, PgTime | None] | None = None,
) -> Prepared | Rejected:
    """prepare() for a message in the lean form: one Segment JSON object (see
    WriteEventsRequest.messages_json). The JSON types are checked first, in the order of the
    fields, and the first bad one rejects the message alone; then the same rules as prepare().

    `times` caches parsed timestamps across the messages of one request.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        return Rejected(
            "", [_violation("message", "TOO_LARGE", f"the message is larger than {MAX_MESSAGE_BYTES} bytes")]
        )
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Rejected("", [_violation("message", "INVALID_JSON", "the message is not valid JSON")])
    if type(msg) is not dict:
        return Rejected(
            "", [_violation("message", "INVALID_TYPE", f"a message must be a JSON object, got {_kind(msg)}")]
        )
    get = msg.get
    sent_id = get("messageId")
    shown_id = sent_id if type(sent_id) is str else ""
    try:
        type_value = get("type")
        if type(type_value) is not str or type_value not in TYPE_NUMBERS:
            if type_value is None:
                raise _Invalid("type", "REQUIRED", "each message needs a type")
            raise _Invalid(
                "type",
                "INVALID_VALUE",
                f"type must be identify, track, page, screen, group or alias, got {str(type_value)[:40]!r}",
            )
        type_name: str = type_value
        message_id = _json_id(sent_id, "messageId")
        raw_user = _json_id(get("userId"), "userId")
        raw_anon = _json_id(get("anonymousId"), "anonymousId")
        raw_previous = _json_id(get("previousId"), "previousId")
        raw_group = _json_id(get("groupId"), "groupId")
        raw_event = _json_str(get("event"), "event")
        properties = _json_obj(get("properties"), "properties")
        raw_name = _json_str(get("name"), "name")
        if type_name == "page" or type_name == "screen":
            if not raw_name and get("name") is None and properties is not None:
                fallback = properties.get("name")
                if type(fallback) is str:
                    raw_name = fallback
            # No category column: keep Segment's page/screen category in the properties,
            # where analytics.js puts it too.
            category = get("category")
            if type(category) is str and category:
                if properties is None:
                    properties = {"category": category}
                elif "category" not in properties:
                    properties["category"] = category
        traits = _json_obj(get("traits"), "traits")
        context = _json_obj(get("context"), "context")
        integrations = _json_obj(get("integrations"), "integrations")
        value = get("timestamp")
        if value is not None:
            original = parse_time(value, "timestamp", times)
        else:
            value = get("originalTimestamp")
            original = None if value is None else parse_time(value, "originalTimestamp", times)
        value = get("sentAt")
        sent_at = None if value is None else parse_time(value, "sentAt", times)
    except _Invalid as invalid:
        return Rejected(shown_id, [invalid.violation])

    bad: list[pb.FieldViolation] = []
    if message_id:
        message_id = message_id.strip()
    if not message_id:
        message_id = str(uuid.uuid4())
    elif len(message_id) > MAX_MESSAGE_ID_CHARS:
        bad.append(
            _violation("messageId", "TOO_LONG", f"messageId is longer than {MAX_MESSAGE_ID_CHARS} characters")
        )
    if "\x00" in message_id:
        bad.append(_violation("messageId", "NUL_CHARACTER", "messageId contains a NUL character"))
    if b"\\" in raw and _NUL_ESCAPE in raw:  # rare (a backslash is): find where
        for field, text in zip(
            _JSON_TEXT_FIELDS, (raw_user, raw_anon, raw_previous, raw_group, raw_event, raw_name), strict=True
        ):
            if "\x00" in text:
                bad.append(_violation(field, "NUL_CHARACTER", f"{field} contains a NUL character"))
        for field, obj in (("properties", properties), ("traits", traits), ("context", context),
                           ("integrations", integrations)):  # fmt: skip
            if obj and _NUL_ESCAPE in orjson.dumps(obj):
                bad.append(_violation(field, "NUL_CHARACTER", f"{field} contains a NUL character (\\u0000)"))
    if bad:
        return Rejected(shown_id, bad)
    user_id, anonymous_id, previous_id, group_id, event_name = _check_ids(
        type_name, raw_user, raw_anon, raw_previous, raw_group, raw_event, bad
    )
    if bad:
        return Rejected(shown_id, bad)

    if context is None:
        context = {}
    page = context.get("page")
    if not (type(page) is dict and page.get("referrer")):
        # A mobile referrer (deep link) counts as the page's referrer when it has none.
        ref = context.get("referrer")
        url = ref.get("url") if type(ref) is dict else None
        if type(url) is str and url:
            _set_default(context, ("page", "referrer"), url)
    if client_ip and not context.get("ip"):
        context["ip"] = client_ip
    campaign, clicks = _page_campaign(context)
    if _explicit_campaign(context, campaign):
        context["campaign"] = campaign
    received = _received(received_at)

    row = (
        source.space_id,
        source.id,
        message_id,
        type_name,
        user_id,
        anonymous_id,
        previous_id,
        group_id,
        event_name,
        raw_name.strip() or None,
        _event_time(original, sent_at, received),
        original,
        sent_at,
        received,
        JSONB + orjson.dumps(properties) if properties else None,
        JSONB + orjson.dumps(traits) if traits else None,
        JSONB + orjson.dumps(context) if context else None,
        JSONB + orjson.dumps(integrations) if integrations else None,
        JSONB + orjson.dumps(campaign) if campaign else None,
        JSONB + orjson.dumps(clicks) if clicks else None,
    )
    idents = _identifiers(user_id, anonymous_id, previous_id, traits, context) if collect_identifiers else ()
    return Prepared(message_id, row, idents)


def _set_default(obj: dict[str, Any], path: tuple[str, ...], value: str) -> bool:
    for key in path[:-1]:
        nxt = obj.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            obj[key] = nxt
        obj = nxt
    if obj.get(path[-1]):
        return False
    obj[path[-1]] = value
    return True


def row_to_event(r: Any) -> event_pb2.Event:
    """A stored row (ingest.events / event_log record) as the shared Event envelope."""
    ev = event_pb2.Event(
        type=TYPE_NUMBERS.get(r["type"], 0),  # type: ignore[arg-type]
        message_id=r["message_id"],
        user_id=r["user_id"] or "",
        anonymous_id=r["anonymous_id"] or "",
        previous_id=r["previous_id"] or "",
        group_id=r["group_id"] or "",
        event=r["event"] or "",
        name=r["name"] or "",
        source_id=r["source_id"],
        space_id=r["space_id"],
    )
    for field in ("properties", "traits", "context", "integrations"):
        if r[field]:
            setattr(ev, f"{field}_json", orjson.dumps(r[field]))
    ev.timestamp.FromDatetime(r["timestamp"])
    ev.received_at.FromDatetime(r["received_at"])
    if r["original_timestamp"] is not None:
        ev.original_timestamp.FromDatetime(r["original_timestamp"])
    if r["sent_at"] is not None:
        ev.sent_at.FromDatetime(r["sent_at"])
    ctx: dict[str, Any] = r["context"] or {}
    page: dict[str, Any] = ctx["page"] if isinstance(ctx.get("page"), dict) else {}
    device: dict[str, Any] = ctx["device"] if isinstance(ctx.get("device"), dict) else {}
    ev.ip = str(ctx.get("ip") or "")
    ev.user_agent = str(ctx.get("userAgent") or "")
    ev.page_url = str(page.get("url") or "")
    ev.referrer = str(page.get("referrer") or "")
    ev.device_id = str(device.get("id") or "")
    ev.advertising_id = str(device.get("advertisingId") or "")
    ev.device_token = str(device.get("token") or "")
    camp = r["campaign"] or {}
    for key, value in camp.items():
        if key in CAMPAIGN_FIELDS:
            setattr(ev.campaign, key, str(value))
        else:
            ev.campaign.extra[key] = str(value)
    for c in r["click_ids"] or []:
        ev.click_ids.add(kind=c["kind"], network=c["network"], value=c["value"])
    return ev
