"""Pure ingest logic: validation, normalisation and the stored row of one message.

No I/O here: the servicer calls `prepare()` for each message of a batch and hands the rows to the
writer. Field names in violations are Segment's JSON names, so a gateway can pass them on as is.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
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

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
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
        return datetime.fromtimestamp(t.seconds + t.nanos / 1e9, tz=UTC)
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


def prepare(
    msg: event_pb2.Event,
    *,
    source: Source,
    received_at: datetime,
    client_ip: str,
    collect_identifiers: bool = False,
) -> Prepared | list[pb.FieldViolation]:
    """Validates and normalises one message: the row to store, or what is wrong with it.

    This runs once per event on the hot path: every field is read once into a local, and the
    common case (a valid message) does no more work than it must.
    """
    type_name = EVENT_TYPES.get(msg.type)
    message_id = msg.message_id
    raw_user, raw_anon, raw_event, raw_name = msg.user_id, msg.anonymous_id, msg.event, msg.name
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
    if msg.ByteSize() > MAX_MESSAGE_BYTES:
        bad.append(
            _violation("message", "TOO_LARGE", f"the message is larger than {MAX_MESSAGE_BYTES} bytes")
        )
        return bad
    # Postgres text and jsonb cannot hold NUL: refuse it here rather than fail a whole commit.
    # (A raw NUL byte is invalid JSON anyway, so only the escape needs looking for.)
    if "\x00" in f"{raw_user}{raw_anon}{msg.previous_id}{msg.group_id}{raw_event}{raw_name}":
        for field, value in (("userId", raw_user), ("anonymousId", raw_anon), ("previousId", msg.previous_id),
                             ("groupId", msg.group_id), ("event", raw_event), ("name", raw_name)):  # fmt: skip
            if "\x00" in value:
                bad.append(_violation(field, "NUL_CHARACTER", f"{field} contains a NUL character"))
    for field, raw in (("properties", raw_props), ("traits", raw_traits), ("context", raw_ctx),
                       ("integrations", raw_integ)):  # fmt: skip
        if raw and b"\\u0000" in raw:
            bad.append(_violation(field, "NUL_CHARACTER", f"{field} contains a NUL character (\\u0000)"))
    if bad:
        return bad

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
        previous_id = _usable(msg.previous_id)
        if previous_id is None:
            reason = "JUNK_ID" if msg.previous_id.strip() else "REQUIRED"
            bad.append(_violation("previousId", reason, "alias needs a real previousId"))
        if user_id is None:
            reason = "JUNK_ID" if raw_user.strip() else "REQUIRED"
            bad.append(_violation("userId", reason, "alias needs a real userId"))
    elif type_name == "group":
        group_id = _usable(msg.group_id)
        if group_id is None:
            reason = "JUNK_ID" if msg.group_id.strip() else "REQUIRED"
            bad.append(_violation("groupId", reason, "group needs a real groupId"))

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

    page = context.get("page")
    campaign: dict[str, Any]
    clicks: list[dict[str, str]]
    if type(page) is dict and (page.get("url") or page.get("search")):
        u, q = page.get("url"), page.get("search")
        campaign, clicks = parse_campaign(u if type(u) is str else "", q if type(q) is str else "")
    else:
        campaign, clicks = {}, []
    explicit = context.get("campaign")
    if type(explicit) is dict:
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
    if original is not None and sent_at is not None:
        try:
            timestamp = received_at - (sent_at - original)
        except OverflowError:  # device clocks at opposite ends of the calendar
            timestamp = original
    else:
        timestamp = original or received_at

    context_bytes = orjson.dumps(context) if context_changed else (raw_ctx or None)
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
        timestamp,
        original,
        sent_at,
        received_at,
        raw_props or None,
        raw_traits or None,
        context_bytes,
        raw_integ or None,
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
