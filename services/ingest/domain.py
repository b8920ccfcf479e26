"""Pure ingest logic: validation, normalisation and the stored row of one message.

No I/O here: the servicer calls `prepare()` for each message of a batch and hands the rows to the
writer. Field names in violations are Segment's JSON names, so a gateway can pass them on as is.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit

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

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
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
    """A valid message, ready to store. `row` matches store.EVENT_COLUMNS."""

    message_id: str
    row: tuple[Any, ...]
    # The identifiers a suppression can match (only collected when the space has suppressions).
    identifiers: tuple[tuple[str, str], ...] = ()


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


def _ts(msg: event_pb2.Event, field: str) -> datetime | None:
    if not msg.HasField(field):  # type: ignore[arg-type]
        return None
    t = getattr(msg, field)
    try:
        return datetime.fromtimestamp(t.seconds + t.nanos / 1e9, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


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
    """
    query = ""
    if url:
        try:
            query = urlsplit(url).query
        except ValueError:
            query = ""
    if search:
        query = (query + "&" + search.lstrip("?")) if query else search.lstrip("?")
    campaign: dict[str, Any] = {}
    clicks: list[dict[str, str]] = []
    if not query:
        return campaign, clicks
    seen_clicks: set[str] = set()
    for key, value in parse_qsl(query, keep_blank_values=False):
        k = key.lower()
        value = value.strip()
        if not value:
            continue
        if k.startswith("utm_"):
            name = CAMPAIGN_KEYS.get(k, k[4:])
            if name and name not in campaign:
                campaign[name] = value
        elif k in CLICK_ID_NETWORKS and k not in seen_clicks:
            seen_clicks.add(k)
            clicks.append({"kind": k, "network": CLICK_ID_NETWORKS[k], "value": value})
    return campaign, clicks


def _usable(value: str) -> str | None:
    value = value.strip()
    return None if not value or is_junk_id(value) else value


def prepare(
    msg: event_pb2.Event,
    *,
    source: Source,
    received_at: datetime,
    client_ip: str,
    collect_identifiers: bool = False,
) -> Prepared | list[pb.FieldViolation]:
    """Validates and normalises one message: the row to store, or what is wrong with it."""
    bad: list[pb.FieldViolation] = []
    type_name = EVENT_TYPES.get(msg.type)
    if type_name is None:
        bad.append(_violation("type", "INVALID_TYPE", "type must be identify, track, page, screen, group or alias"))

    message_id = msg.message_id.strip()
    if not message_id:
        message_id = str(uuid.uuid4())
    elif len(message_id) > MAX_MESSAGE_ID_CHARS:
        bad.append(_violation("messageId", "TOO_LONG", f"messageId is longer than {MAX_MESSAGE_ID_CHARS} characters"))

    if msg.ByteSize() > MAX_MESSAGE_BYTES:
        bad.append(_violation("message", "TOO_LARGE", f"the message is larger than {MAX_MESSAGE_BYTES} bytes"))
        return bad

    for field, value in (("userId", msg.user_id), ("anonymousId", msg.anonymous_id),
                         ("previousId", msg.previous_id), ("groupId", msg.group_id),
                         ("event", msg.event), ("name", msg.name)):  # fmt: skip
        if "\x00" in value:
            bad.append(_violation(field, "NUL_CHARACTER", f"{field} contains a NUL character"))
    for field, raw in (("properties", msg.properties_json), ("traits", msg.traits_json),
                       ("context", msg.context_json), ("integrations", msg.integrations_json)):  # fmt: skip
        # Postgres text and jsonb cannot hold NUL: refuse it here rather than fail a whole commit.
        if b"\\u0000" in raw or b"\x00" in raw:
            bad.append(_violation(field, "NUL_CHARACTER", f"{field} contains a NUL character (\\u0000)"))
    if bad:
        return bad

    user_id = _usable(msg.user_id)
    anonymous_id = _usable(msg.anonymous_id)
    if user_id is None and anonymous_id is None:
        if msg.user_id.strip() or msg.anonymous_id.strip():
            junk = msg.user_id if msg.user_id.strip() else msg.anonymous_id
            field = "userId" if msg.user_id.strip() else "anonymousId"
            bad.append(_violation(field, "JUNK_ID", f"{junk!r} is a placeholder, not an id; send a real userId or anonymousId"))
        else:
            bad.append(_violation("userId", "REQUIRED", "userId or anonymousId is required"))

    previous_id = group_id = event_name = None
    if type_name == "track":
        event_name = msg.event.strip() or None
        if event_name is None:
            bad.append(_violation("event", "REQUIRED", "track needs an event name"))
    elif type_name == "alias":
        previous_id = _usable(msg.previous_id)
        if previous_id is None:
            reason = "JUNK_ID" if msg.previous_id.strip() else "REQUIRED"
            bad.append(_violation("previousId", reason, "alias needs a real previousId"))
        if user_id is None:
            reason = "JUNK_ID" if msg.user_id.strip() else "REQUIRED"
            bad.append(_violation("userId", reason, "alias needs a real userId"))
    elif type_name == "group":
        group_id = _usable(msg.group_id)
        if group_id is None:
            reason = "JUNK_ID" if msg.group_id.strip() else "REQUIRED"
            bad.append(_violation("groupId", reason, "group needs a real groupId"))

    props = _json_object(msg.properties_json, "properties", bad)
    traits = _json_object(msg.traits_json, "traits", bad)
    context = _json_object(msg.context_json, "context", bad)
    integrations = _json_object(msg.integrations_json, "integrations", bad)
    if bad:
        return bad
    _ = props, integrations  # validated only: stored as the bytes received

    context_changed = False
    if context is None:
        context = {}
    # Typed mirrors sent by gRPC clients fill what context lacks: context stays the one truth.
    for typed, path in (
        (msg.ip, ("ip",)),
        (msg.user_agent, ("userAgent",)),
        (msg.page_url, ("page", "url")),
        (msg.referrer, ("page", "referrer")),
        (msg.device_id, ("device", "id")),
        (msg.advertising_id, ("device", "advertisingId")),
        (msg.device_token, ("device", "token")),
    ):
        if typed:
            context_changed |= _set_default(context, path, typed)
    if client_ip and not context.get("ip"):
        context["ip"] = client_ip
        context_changed = True

    page = context.get("page")
    page_url = page_search = ""
    if isinstance(page, dict):
        u, s = page.get("url"), page.get("search")
        page_url = u if isinstance(u, str) else ""
        page_search = s if isinstance(s, str) else ""
    campaign, clicks = parse_campaign(page_url, page_search)
    explicit = context.get("campaign")
    if isinstance(explicit, dict):
        for key, value in explicit.items():
            if isinstance(value, str | int | float) and str(value).strip():
                campaign[key] = str(value).strip()
    if msg.HasField("campaign"):
        for key in CAMPAIGN_FIELDS:
            value = getattr(msg.campaign, key)
            if value:
                campaign[key] = value
        campaign.update(msg.campaign.extra)
    if campaign and explicit != campaign:
        context["campaign"] = campaign
        context_changed = True
    for c in msg.click_ids:
        if c.value and all(x["kind"] != c.kind for x in clicks):
            clicks.append({"kind": c.kind, "network": c.network or CLICK_ID_NETWORKS.get(c.kind, ""), "value": c.value})

    original = _ts(msg, "original_timestamp") or _ts(msg, "timestamp")
    sent_at = _ts(msg, "sent_at")
    if original is not None and sent_at is not None:
        timestamp = received_at - (sent_at - original)
    else:
        timestamp = original or received_at

    context_bytes = orjson.dumps(context) if context_changed else (msg.context_json or None)
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
        msg.name.strip() or None,
        timestamp,
        original,
        sent_at,
        received_at,
        msg.properties_json or None,
        msg.traits_json or None,
        context_bytes,
        msg.integrations_json or None,
        orjson.dumps(campaign) if campaign else None,
        orjson.dumps(clicks) if clicks else None,
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
    ctx = r["context"] or {}
    page = ctx.get("page") if isinstance(ctx.get("page"), dict) else {}
    device = ctx.get("device") if isinstance(ctx.get("device"), dict) else {}
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
