"""The gateway fuzzed with thousands of malformed requests over real HTTP, against a real
ingest and Postgres: random bytes, bad and truncated gzip, gzip bombs, JSON of the wrong
shapes, wrong field types, huge, odd and extreme values, bad base64 pixels, odd headers.

Whatever arrives, the gateway never answers 5xx, and nothing is stored half-way:

* a 200 means every message of the request is stored (each once);
* a 400 ``invalid_messages`` lists exactly the messages that were not stored, and all the
  others are;
* any other answer stores nothing;
* the pixel always answers its GIF, and stores its one message or nothing.

Each request gets a source of its own, so what it stored is exactly that source's rows.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from grpc_health.v1 import health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from services.gateway.app import build_app, open_ingest_channel, serve
from services.gateway.segment import MAX_BATCH_MESSAGES, MAX_BODY_BYTES, MAX_MESSAGE_BYTES
from services.gateway.settings import GatewaySettings, parse_networks
from services.ingest.app import IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.ingest.v1 import ingest_service_pb2_grpc

# Hypothesis examples, and requests in each: 2,000 requests in all.
EXAMPLES = 400
PER_EXAMPLE = 5
BATCH_ROUTES = ("batch", "b", "import")
SINGLE_ROUTES = ("track", "t", "identify", "i", "page", "p", "screen", "s", "group", "g", "alias", "a")
# aiohttp refuses a request line (so a pixel URL) longer than this with a 4xx of its own.
MAX_REQUEST_LINE = 8190
TYPES = ("track", "identify", "page", "screen", "group", "alias")


@dataclass
class Target:
    url: str
    pool: asyncpg.Pool
    http: aiohttp.ClientSession


@pytest.fixture(scope="module")
async def target(pool: asyncpg.Pool) -> AsyncIterator[Target]:
    ingest = await start_ingest(pool, IngestSettings.for_tests())
    channel = open_ingest_channel(ingest.address)
    # Trusting loopback as a proxy makes the gateway read (fuzzed) X-Forwarded-For headers.
    settings = GatewaySettings.for_tests(ingest.address, trusted_proxies=parse_networks(("127.0.0.0/8",)))
    app = build_app(
        ingest_service_pb2_grpc.IngestServiceStub(channel),
        settings,
        health=health_pb2_grpc.HealthStub(channel),
    )
    server = await serve(app, settings)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False) as http:
        yield Target(server.url, pool, http)
    await server.stop()
    await channel.close()
    await ingest.stop()


# -- what a request is made of -----------------------------------------------------------------

# No digits: a message id's digits are its index in the batch, so that ids never collide.
ODD_TEXT = st.text(
    alphabet=st.sampled_from(
        [" ", "\t", "\n", "a", "Z", "é", "ß", "中", "😀", "\u200b", "\x00", "-", "_", "/", "%"]
    ),
    max_size=6,
)
SAFE_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    SAFE_TEXT,
)
JSON_VALUE = st.one_of(
    JSON_SCALAR, st.lists(JSON_SCALAR, max_size=3), st.dictionaries(SAFE_TEXT, JSON_SCALAR, max_size=3)
)
TIMESTAMP = st.one_of(
    st.sampled_from([
        "2026-11-29T10:00:00Z", "2026-11-29T10:00:00.123456789+02:00", "2026-11-29 10:00:00", "2026-11-29",
        "0001-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59-14:00",
        "1970-01-01T00:00:00Z", "2026-13-45T99:99:99Z", "yesterday", "", "2026-11-29T10:00:00+25:00",
    ]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.lists(st.integers(0, 10**12), max_size=2),
    SAFE_TEXT,
)  # fmt: skip
CLOCKS = [
    ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"),
    ("9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z"),
    ("1970-01-01T00:00:00Z", "2026-11-29T10:00:00Z"),
    ("2026-11-29T10:00:00Z", "2026-11-29T09:00:00-14:00"),
    ("9999-12-31T23:59:59-14:00", "2026-11-29T10:00:00Z"),
]
ID_VALUE = st.one_of(
    st.sampled_from(["u-1", "anon-1", "user@example.com", "undefined", "null", "0", "", "   ", "42"]),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.builds(lambda n, c: c * n, st.integers(200, 5000), st.sampled_from(["x", "é", "😀", " "])),
    st.lists(st.integers(0, 9), max_size=2),
    st.just({"id": 1}),
    st.booleans(),
    st.none(),
    SAFE_TEXT,
)
CONTEXT = st.one_of(
    st.dictionaries(SAFE_TEXT, JSON_VALUE, max_size=4),
    st.just({"page": {"url": "https://shop.example/?utm_campaign=fuzz&utm_source=x&gclid=abc"}}),
    st.just({"ip": "203.0.113.7", "device": {"id": "d-1", "advertisingId": 7}, "page": "nope"}),
    st.just({"text": "\x00nul"}),
)
OBJECT_FIELD = st.one_of(CONTEXT, JSON_SCALAR, st.lists(JSON_SCALAR, max_size=3))


_ABSENT = object()
# How a message id is written: its kind, and odd text around its index.
MESSAGE_ID = st.tuples(
    st.sampled_from(["str", "str", "str", "absent", "int", "null", "bad", "long", "blank"]),
    ODD_TEXT,
    ODD_TEXT,
    st.sampled_from(["list", "object", "bool", "float"]),
)


def render_message_id(spec: tuple[str, str, str, str], index: int) -> Any:
    kind, before, after, bad = spec
    if kind == "str":
        return f"{before}{index:04d}{after}"
    if kind == "int":
        return 100_000 + index
    if kind == "null":
        return None
    if kind == "bad":
        return {"list": [index], "object": {"id": index}, "bool": True, "float": 1.5 + index}[bad]
    if kind == "long":
        return "m" * 101 + f"{index:04d}"
    if kind == "blank":
        return " \t "
    return _ABSENT


HOSTILE: dict[str, st.SearchStrategy[Any]] = {
    "type": st.one_of(st.sampled_from(["Track", "", "purchase", "identify "]), JSON_SCALAR),
    "userId": ID_VALUE,
    "anonymousId": ID_VALUE,
    "previousId": ID_VALUE,
    "groupId": ID_VALUE,
    "event": JSON_SCALAR,
    "name": JSON_SCALAR,
    "properties": OBJECT_FIELD,
    "traits": OBJECT_FIELD,
    "context": OBJECT_FIELD,
    "integrations": OBJECT_FIELD,
    "timestamp": TIMESTAMP,
    "originalTimestamp": TIMESTAMP,
    "sentAt": TIMESTAMP,
    "category": JSON_SCALAR,
}
HOSTILE_KEYS = st.lists(st.sampled_from(list(HOSTILE)), min_size=1, max_size=2, unique=True)
CHAOS_KEYS = st.lists(st.sampled_from(list(HOSTILE)), max_size=6, unique=True)
TYPE_NAMES = st.sampled_from(["track", "track", "page", "identify", "screen", "group", "alias"])
WHO = st.sampled_from(["userId", "anonymousId", "both"])
SMALL_INT = st.integers(0, 50)
EVENT_NAMES = st.sampled_from(["Order Completed", "Product Viewed", "Email Opened", "ünïcødé 😀"])
PROPERTIES = st.dictionaries(SAFE_TEXT, JSON_VALUE, max_size=3)
GOOD_TIMES = st.sampled_from(["2026-11-29T10:00:00Z", "2026-11-29T10:00:00.5+02:00"])
CLOCK_PAIRS = st.sampled_from(CLOCKS)
MODES = st.sampled_from(["valid"] * 5 + ["mutant"] * 4 + ["chaos"])
ONE_IN_7 = st.integers(0, 6)
ONE_IN_13 = st.integers(0, 12)
ONE_IN_16 = st.integers(0, 15)
ONE_IN_41 = st.integers(0, 40)


@st.composite
def valid_message(draw: st.DrawFn, typed: bool) -> dict[str, Any]:
    type_name = draw(TYPE_NAMES) if typed else "track"
    msg: dict[str, Any] = {"type": type_name} if typed else {}
    who = draw(WHO)
    if who in ("userId", "both"):
        msg["userId"] = f"u-{draw(SMALL_INT)}"
    if who in ("anonymousId", "both"):
        msg["anonymousId"] = f"a-{draw(SMALL_INT)}"
    if type_name == "track":
        msg["event"] = draw(EVENT_NAMES)
    if type_name in ("page", "screen") and draw(st.booleans()):
        msg["name"] = "Home"
    if type_name == "alias":
        msg["previousId"] = "prev-1"
    if type_name == "group":
        msg["groupId"] = "g-1"
    if draw(st.booleans()):
        msg["properties"] = draw(PROPERTIES)
    if draw(st.booleans()):
        msg["context"] = draw(CONTEXT)
    if draw(st.booleans()):
        msg["timestamp"] = draw(GOOD_TIMES)
    if draw(ONE_IN_16) == 0:
        # A device clock and a send time far apart: ingest corrects the skew between them.
        msg["timestamp"], msg["sentAt"] = draw(CLOCK_PAIRS)
    return msg


VALID_TYPED, VALID_UNTYPED = valid_message(True), valid_message(False)


@st.composite
def message(draw: st.DrawFn, typed: bool, big: bool) -> dict[str, Any]:
    """A Segment message (without its id): plausible, plausible but for a field or two, or
    anything."""
    mode = draw(MODES)
    if mode == "chaos":
        msg: dict[str, Any] = {}
        for key in draw(CHAOS_KEYS):
            if key != "type" or typed:
                msg[key] = draw(HOSTILE[key])
    else:
        msg = draw(VALID_TYPED if typed else VALID_UNTYPED)
        if mode == "mutant":
            for key in draw(HOSTILE_KEYS):
                msg[key] = draw(HOSTILE[key])
    if big and draw(ONE_IN_41) == 0:
        msg["properties"] = {"blob": "x" * (MAX_MESSAGE_BYTES + 10)}  # one message over 32 KB
    return msg


TYPED_MESSAGE = st.tuples(message(True, True), MESSAGE_ID)
UNTYPED_MESSAGE = st.tuples(message(False, True), MESSAGE_ID)
PIXEL_MESSAGE = st.tuples(message(False, False), MESSAGE_ID)


def with_id(drawn: tuple[dict[str, Any], tuple[str, str, str, str]], index: int) -> dict[str, Any]:
    msg, spec = drawn
    mid = render_message_id(spec, index)
    if mid is not _ABSENT:
        msg["messageId"] = mid
    return msg


KEY = object()  # stands for the example's write key until the request is made


@dataclass
class Case:
    """One request, and what the oracle needs to know about it. The write key is filled in by
    render(), once the example's source exists."""

    method: str
    path: str
    kind: str = "raw"  # "batch", "single", "pixel" or "raw"
    # The JSON document (before the write key and any encoding), when there is one.
    document: Any = None
    # How the document becomes the body (plain, gzip, truncated-gzip, not-gzip, trailing, cut).
    encoding: str = "plain"
    spoil: bytes = b""
    cut: float = 0.0
    # The body of cases without a document.
    is_raw: bool = False
    raw: bytes = b""
    # Where the write key goes: header, body, both, none, wrong, mangled or bearer.
    auth: str = "header"
    auth_suffix: str = ""
    mangled_header: str = ""
    body_key: Any = KEY
    headers: dict[str, str] = field(default_factory=dict)
    # The pixel: how its data parameter is made, and the payload (None: the clean track).
    pixel: str = ""
    pixel_payload: Any = None
    pixel_bytes: bytes = b""
    pixel_bad: str = ""
    # Filled by render().
    body: bytes = b""
    query: dict[str, str] = field(default_factory=dict)
    sent: Any = None
    clean_pixel: bool = False

    def render(self, key: str) -> None:
        headers = dict(self.headers)
        doc = self.document
        if isinstance(doc, dict) and self.auth in ("body", "both", "mangled"):
            doc = {**doc, "writeKey": key if self.body_key is KEY else self.body_key}
        if self.auth in ("header", "both"):
            headers["Authorization"] = basic(key) + self.auth_suffix
        elif self.auth == "wrong":
            headers["Authorization"] = basic("wk_nobody_" + secrets.token_hex(3))
        elif self.auth == "mangled":
            headers["Authorization"] = self.mangled_header
        elif self.auth == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        self.sent = doc
        if self.kind == "pixel":
            self.render_pixel(key)
        elif self.is_raw:
            self.body = self.raw
        else:
            raw = orjson.dumps(doc)
            if self.encoding == "gzip":
                self.body = gzip.compress(raw)
            elif self.encoding == "truncated-gzip":
                self.body = gzip.compress(raw)[: max(1, len(raw) // 3)]
            elif self.encoding == "trailing":
                self.body = raw + self.spoil
            elif self.encoding == "cut":
                self.body = raw[: int(len(raw) * self.cut)]
            else:
                self.body = raw
        self.headers = headers

    def render_pixel(self, key: str) -> None:
        if self.pixel in ("clean", "clean-urlsafe", "no-padding"):
            payload = orjson.dumps(
                {
                    "writeKey": key,
                    "userId": "u-pixel",
                    "event": "Email Opened",
                    "properties": {"campaign": "fuzz"},
                }
            )
            self.clean_pixel = self.path == "/v1/pixel/track"
        elif self.pixel == "message":
            doc = self.pixel_payload
            if self.auth in ("body", "both"):
                doc = {**doc, "writeKey": key}
            payload = orjson.dumps(doc)
        elif self.pixel == "base64-not-json":
            payload = self.pixel_bytes
        elif self.pixel == "json-array":
            payload = b"[1,2]"
        else:
            payload = b""
        if self.pixel == "clean-urlsafe":
            data = base64.urlsafe_b64encode(payload).decode()
        elif self.pixel == "no-padding":
            data = base64.b64encode(payload).decode().rstrip("=")
        elif self.pixel == "bad-base64":
            data = self.pixel_bad
        else:
            data = base64.b64encode(payload).decode()
        if self.pixel != "missing":
            self.query["data"] = data

    def __repr__(self) -> str:
        if self.sent is not None or self.document is not None:
            doc = orjson.dumps(self.sent if self.sent is not None else self.document).decode()
            what = f"document={doc[:800]}{'...' if len(doc) > 800 else ''} encoding={self.encoding}"
        else:
            what = f"body={self.body[:300]!r}{'...' if len(self.body) > 300 else ''}"
        return f"Case({self.method} {self.path} headers={self.headers} query={str(self.query)[:300]} {what})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints the request, not every field


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


AUTH_MODES = st.sampled_from(["header"] * 6 + ["body", "body", "both", "none", "wrong", "mangled", "bearer"])
AUTH_SUFFIX = st.sampled_from(["", "", " ", "\t"])
MANGLED = st.sampled_from(
    ["Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe:").decode(), "Basic", "basic   "]
)
BODY_KEY = st.one_of(st.just(KEY), st.just(KEY), st.none(), JSON_SCALAR)
CONTENT_TYPES = st.sampled_from(
    ["application/json"] * 20
    + ["text/plain", "application/json; charset=utf-8", "APPLICATION/JSON", "", "application/xml",
       "multipart/form-data; boundary=x", "text/plain;charset=latin1"]
)  # fmt: skip
FORWARDED = st.sampled_from(
    ["203.0.113.9", "garbage, 10.0.0.1", ", , ,", "::1, 198.51.100.2", "[::1]:80", "1.2.3.4:5"]
)
ODD_ENCODINGS = st.sampled_from(["br", "deflate", "identity", "gzip, gzip", "GZIP ", "zstd"])
ENCODINGS = st.sampled_from(
    ["plain"] * 12 + ["gzip", "gzip", "gzip", "truncated-gzip", "not-gzip", "trailing", "cut"]
)
GZIP_NAMES = st.sampled_from(["gzip", "x-gzip"])
SPOILS = st.sampled_from([b"}", b" x", b"\x00", b"\n\n"])
FRACTION = st.floats(0, 0.99)
ONE_IN_6 = st.integers(0, 5)
ONE_IN_30 = st.integers(0, 29)


@st.composite
def headers_and_encoding(draw: st.DrawFn, case: Case) -> Case:
    """Where the key goes, odd headers, and how the body is encoded or spoiled."""
    case.auth = draw(AUTH_MODES)
    case.auth_suffix = draw(AUTH_SUFFIX)
    if case.auth == "mangled":
        case.mangled_header = draw(MANGLED)
        case.body_key = draw(BODY_KEY)
    case.headers["Content-Type"] = draw(CONTENT_TYPES)
    if draw(ONE_IN_6) == 0:
        case.headers["X-Forwarded-For"] = draw(FORWARDED)
    case.encoding = draw(ENCODINGS)
    if case.encoding in ("gzip", "truncated-gzip", "not-gzip"):
        case.headers["Content-Encoding"] = draw(GZIP_NAMES)
    case.spoil = draw(SPOILS)
    case.cut = draw(FRACTION)
    if draw(ONE_IN_30) == 0:
        case.headers["Content-Encoding"] = draw(ODD_ENCODINGS)
    return case


BATCH_SIZE = st.integers(0, 6)
BATCH_SHAPES = st.sampled_from(
    ["ok"] * 16 + ["batch-not-list", "no-batch", "top-array", "top-scalar", "too-many"]
)
NOT_A_LIST = st.one_of(JSON_SCALAR, st.dictionaries(SAFE_TEXT, JSON_SCALAR, max_size=2))
TOO_MANY = [{"type": "track", "event": "E", "userId": "u"}] * (MAX_BATCH_MESSAGES + 1)


@st.composite
def batch_case(draw: st.DrawFn) -> Case:
    case = Case("POST", f"/v1/{draw(st.sampled_from(BATCH_ROUTES))}", kind="batch")
    entries: list[Any] = []
    for i in range(draw(BATCH_SIZE)):
        if draw(ONE_IN_13) == 0:
            entries.append(draw(JSON_SCALAR))  # not an object
        else:
            entries.append(with_id(draw(TYPED_MESSAGE), i))
    document: Any = {"batch": entries}
    shape = draw(BATCH_SHAPES)
    if shape == "batch-not-list":
        document["batch"] = draw(NOT_A_LIST)
    elif shape == "no-batch":
        del document["batch"]
    elif shape == "too-many":
        document["batch"] = TOO_MANY
    for top in ("context", "integrations", "sentAt"):
        if draw(ONE_IN_7) == 0:
            document[top] = draw(TIMESTAMP if top == "sentAt" else OBJECT_FIELD)
    if shape == "top-array":
        document = [document]
    elif shape == "top-scalar":
        document = draw(JSON_SCALAR)
    case.document = document
    return draw(headers_and_encoding(case))


TYPED_SINGLE = st.integers(0, 4)


@st.composite
def single_case(draw: st.DrawFn) -> Case:
    case = Case("POST", f"/v1/{draw(st.sampled_from(SINGLE_ROUTES))}", kind="single")
    case.document = with_id(draw(TYPED_MESSAGE if draw(TYPED_SINGLE) == 0 else UNTYPED_MESSAGE), 0)
    return draw(headers_and_encoding(case))


PIXEL_TYPES = st.sampled_from([*TYPES, "track", "track", "nope", "TRACK"])
PIXEL_WAYS = st.sampled_from(
    [
        "clean",
        "clean-urlsafe",
        "message",
        "bad-base64",
        "base64-not-json",
        "missing",
        "json-array",
        "no-padding",
    ]
)
BAD_BASE64 = st.sampled_from(["!!!!", "a", "====", "%%%", "\u00e9t\u00e9", "YWJj$"])
PIXEL_AUTH = st.sampled_from(["body", "body", "header", "none", "wrong"])


@st.composite
def pixel_case(draw: st.DrawFn) -> Case:
    case = Case("GET", f"/v1/pixel/{draw(PIXEL_TYPES)}", kind="pixel")
    case.pixel = draw(PIXEL_WAYS)
    case.auth = "none"
    if case.pixel == "message":
        case.pixel_payload = with_id(draw(PIXEL_MESSAGE), 0)
        case.auth = draw(PIXEL_AUTH)
    elif case.pixel == "base64-not-json":
        case.pixel_bytes = draw(st.binary(max_size=40))
    elif case.pixel == "bad-base64":
        case.pixel_bad = draw(BAD_BASE64)
    return case


RAW_WAYS = st.sampled_from(["bytes", "bytes", "bomb", "huge", "bad-utf8", "deep", "surrogate", "bigint",
                            "wrong-method", "unknown-route", "empty"])  # fmt: skip
ANY_ROUTE = st.sampled_from([*BATCH_ROUTES, *SINGLE_ROUTES])
WRONG_METHODS = st.sampled_from(["GET", "PUT", "DELETE", "PATCH"])
UNKNOWN_ROUTES = st.sampled_from(["/v1/", "/v1/pixel", "/v2/track", "/v1/batch/x", "/v1/%00", "/"])
RAW_BODIES = {
    "bomb": gzip.compress(b" " * (MAX_BODY_BYTES + 1000)),
    "huge": b'{"batch": [], "x": "' + b"y" * (MAX_BODY_BYTES + 10) + b'"}',
    "bad-utf8": b'{"type": "track", "userId": "\xff\xfe", "event": "E", "batch": []}',
    "deep": b'{"batch": [' + b"[" * 2000 + b"]" * 2000 + b"]}",
    "surrogate": b'{"type": "track", "userId": "\\ud800", "event": "E", "batch": [{"type": "track", "userId": "\\udfff"}]}',
    "bigint": b'{"type": "track", "userId": 123456789012345678901234567890, "event": "E", "properties": {"n": 1e400}}',
}


@st.composite
def raw_case(draw: st.DrawFn) -> Case:
    """Bytes that were never JSON, gzip bombs, bodies over the limit, wrong methods and routes."""
    how = draw(RAW_WAYS)
    route = draw(ANY_ROUTE)
    case = Case("POST", f"/v1/{route}", kind="batch" if route in BATCH_ROUTES else "single")
    case.headers["Content-Type"] = "application/json"
    case.is_raw = True
    case.raw = RAW_BODIES.get(how, b"")
    if how == "bomb":
        case.headers["Content-Encoding"] = "gzip"
    elif how == "bytes":
        case.raw = draw(st.binary(max_size=200))
        if draw(st.booleans()):
            case.headers["Content-Encoding"] = "gzip"
    elif how == "wrong-method":
        case.method = draw(WRONG_METHODS)
        case.kind = "raw"
    elif how == "unknown-route":
        case.path = draw(UNKNOWN_ROUTES)
        case.kind = "raw"
    return case


REQUESTS = st.one_of(batch_case(), batch_case(), single_case(), pixel_case(), raw_case())


# -- the oracle --------------------------------------------------------------------------------


def expected_id(msg: Any) -> str | None:
    """The id a message is stored under, when it can be known in advance."""
    if not isinstance(msg, dict):
        return None
    mid = msg.get("messageId")
    if isinstance(mid, str) and mid.strip() and len(mid.strip()) <= 100:
        return mid.strip()
    if isinstance(mid, int) and not isinstance(mid, bool):
        return str(mid)
    return None


def messages_of(case: Case) -> list[Any]:
    """The messages of the request as the client meant them."""
    doc = case.sent
    if doc is None:  # raw bytes: whatever they parse to
        try:
            doc = orjson.loads(
                gzip.decompress(case.body)
                if "gzip" in case.headers.get("Content-Encoding", "")
                else case.body
            )
        except Exception:
            return []
    if case.kind == "batch":
        batch = doc.get("batch") if isinstance(doc, dict) else None
        return batch if isinstance(batch, list) else []
    return [doc]


def check(case: Case, status: int, content_type: str, answer: Any, stored: list[str]) -> None:
    context = f"{case!r} -> {status} {answer!r:.600}; stored {len(stored)}"
    assert status < 500, context
    assert len(stored) == len(set(stored)), "a message stored twice: " + context
    if case.kind == "pixel":
        if len(case.query.get("data", "")) > MAX_REQUEST_LINE:
            # Refused by the HTTP server before the gateway sees it.
            assert 400 <= status < 500 and stored == [], context
            return
        assert (status, content_type) == (200, "image/gif"), context
        assert len(stored) <= 1, context
        if case.clean_pixel:
            assert len(stored) == 1, context
        return
    if case.method != "POST" or case.kind == "raw":
        assert stored == [], context
        return
    assert content_type == "application/json", context
    assert isinstance(answer, dict), context
    messages = messages_of(case)
    if status == 200:
        assert answer == {"success": True}, context
        assert len(stored) == len(messages), "a 200 that did not store every message: " + context
        known = {expected_id(m) for m in messages} - {None}
        assert known <= set(stored), context
    elif status == 400 and answer.get("code") == "invalid_messages":
        bad = {e["index"] for e in answer["errors"]}
        assert bad and all(0 <= i < len(messages) for i in bad), context
        assert all(e["field"] is not None and e["reason"] and e["description"] for e in answer["errors"]), (
            context
        )
        good = [i for i in range(len(messages)) if i not in bad]
        assert len(stored) == len(good), "stored is not exactly the messages not listed: " + context
        assert answer["accepted"] + answer["duplicates"] == len(good), context
        for i, m in enumerate(messages):
            mid = expected_id(m)
            if mid is not None:
                assert (mid in stored) == (i not in bad), f"message {i} ({mid!r}): " + context
    else:
        assert 400 <= status < 500 and answer.get("code") and answer.get("message"), context
        assert stored == [], "a refused request stored something: " + context


async def send(target: Target, case: Case) -> tuple[int, str, Any]:
    """The request over HTTP: (status, content type, the JSON answer or None)."""
    async with target.http.request(
        case.method, target.url + case.path, data=case.body or None, headers=case.headers, params=case.query
    ) as resp:
        body = await resp.read()
        answer = orjson.loads(body) if resp.content_type == "application/json" else None
        return resp.status, resp.content_type, answer


async def new_source(pool: asyncpg.Pool) -> tuple[str, str]:
    key = "wk_fuzz_" + secrets.token_hex(8)
    return key, await create_source(pool, write_key=key, name="fuzz")


@pytest.mark.timeout(120)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    # No shrinking: with five requests an example it takes minutes, and the failure message
    # already names the request that failed and what it sent.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(cases=st.lists(REQUESTS, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
async def test_malformed_requests_never_5xx_and_never_store_half(target: Target, cases: list[Case]) -> None:
    # The requests of an example go at once (the gateway and ingest see them concurrently), each
    # with a source of its own, so that what each one stored is exactly its source's rows.
    sources = await asyncio.gather(*(new_source(target.pool) for _ in cases))
    for case, (key, _) in zip(cases, sources, strict=True):
        case.render(key)
    answers = await asyncio.gather(*(send(target, case) for case in cases))
    rows = await target.pool.fetch(
        "select source_id, message_id from ingest.events where source_id = any($1::text[])",
        [source_id for _, source_id in sources],
    )
    for case, (_, source_id), (status, content_type, answer) in zip(cases, sources, answers, strict=True):
        stored = [r["message_id"] for r in rows if r["source_id"] == source_id]
        check(case, status, content_type, answer, stored)
