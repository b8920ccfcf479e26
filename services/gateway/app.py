"""The gateway's HTTP surface: Segment's tracking API, the email pixel, /health and /metrics.

Every request that carries events becomes one IngestService.WriteEvents call; the HTTP answer
follows ingest's, so a 200 always means every message was committed (or was a duplicate of one
that was), and nothing else ever answers 200. The gateway keeps no state and owns no tables.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

from services.gateway import segment
from services.gateway.read_api import ReadApi, add_read_routes
from services.gateway.segment import MAX_BODY_BYTES, RequestError, Translation
from services.gateway.settings import GatewaySettings, IPNetwork, parse_listen
from touchpoint.ingest.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from touchpoint.platform.errors import ErrorDetails, details_of

log = logging.getLogger(__name__)

INGEST_SERVICE = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name

REQUESTS = Counter(
    "touchpoint_gateway_http_requests_total",
    "HTTP requests by route template and status code. For the pixel, which always answers a GIF, "
    "code is the status a JSON route would have answered, so that its failures are counted.",
    ["route", "code"],
)
REQUEST_SECONDS = Histogram(
    "touchpoint_gateway_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MESSAGES = Counter(
    "touchpoint_gateway_messages_total",
    "Messages received, by outcome: accepted, duplicate, rejected (by ingest), suppressed (GDPR), "
    "invalid (could not be translated) or failed (the whole request failed: bad key, overload, "
    "ingest down).",
    ["outcome"],
)

# The smallest transparent 1x1 GIF.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
# Every open of an email must reach us: no cache may answer for us.
_PIXEL_HEADERS = {
    "Cache-Control": "no-cache, no-store, must-revalidate, private, max-age=0",
    "Pragma": "no-cache",
    "Expires": "0",
}
# Browsers (analytics.js) read our answers cross-origin: without these a fetch() of /v1/t fails
# on the client even though the event was stored, and the library retries it. No cookies are
# involved (the key is in the body or an explicit header), so any origin may call.
_CORS_HEADERS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "Retry-After"}
_PREFLIGHT_HEADERS = {
    **_CORS_HEADERS,
    "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Content-Encoding, Authorization",
    "Access-Control-Max-Age": "86400",
}
_JSON_TYPES = ("", "application/json", "text/plain")
_GZIP = ("gzip", "x-gzip")
# Per-request key under which a handler records the status to count, when it differs from the
# HTTP status (the pixel).
_METRIC_CODE = web.RequestKey("metric_code", int)
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
)

# Options of the one ingest channel per process. Short reconnect backoff: after an ingest
# restart the gateway must stop answering 503 within a second or two, not grpc's default of up
# to two minutes.
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
)


def open_ingest_channel(address: str, *, own_connection: bool = False) -> grpc.aio.Channel:
    """A channel to ingest. With own_connection, it does not share its TCP connection with the
    process's other channels (grpc pools subchannels per target by default)."""
    options = [*CHANNEL_OPTIONS, *([("grpc.use_local_subchannel_pool", 1)] if own_connection else [])]
    return grpc.aio.insecure_channel(address, options=options)


class IngestWriter:
    """WriteEvents over several connections to ingest, used in turn (see
    GatewaySettings.ingest_connections); a request larger than ingest's limit, which a large
    batch-level context merged into every message can make, is sent in parts."""

    def __init__(self, stubs: Sequence[ingest_service_pb2_grpc.IngestServiceStub]) -> None:
        self.stubs = list(stubs)
        self._next = 0

    async def WriteEvents(
        self, request: ingest_service_pb2.WriteEventsRequest, timeout: float | None = None
    ) -> ingest_service_pb2.WriteEventsResponse:
        if request.ByteSize() <= INGEST_REQUEST_LIMIT or len(request.events):
            return await self._call(request, timeout)
        # The lean form only (the gateway sends no events); parts keep the request's options,
        # and results are re-indexed to the whole request.
        answer = ingest_service_pb2.WriteEventsResponse()
        part = ingest_service_pb2.WriteEventsRequest(
            write_key=request.write_key,
            client_ip=request.client_ip,
            omit_accepted_results=request.omit_accepted_results,
        )
        size = part.ByteSize()
        offset = 0
        for message in request.messages_json:
            n = len(message) + 8
            if len(part.messages_json) and size + n > INGEST_REQUEST_LIMIT:
                _add(answer, await self._call(part, timeout), offset)
                offset += len(part.messages_json)
                del part.messages_json[:]
                size = part.ByteSize()
            part.messages_json.append(message)
            size += n
        _add(answer, await self._call(part, timeout), offset)
        return answer

    async def _call(
        self, request: ingest_service_pb2.WriteEventsRequest, timeout: float | None
    ) -> ingest_service_pb2.WriteEventsResponse:
        stub = self.stubs[self._next % len(self.stubs)]
        self._next += 1
        response: ingest_service_pb2.WriteEventsResponse = await stub.WriteEvents(request, timeout=timeout)
        return response


# Ingest refuses requests over 500 KB; parts stay below it with room for framing.
INGEST_REQUEST_LIMIT = 480 * 1024


def _add(
    total: ingest_service_pb2.WriteEventsResponse, part: ingest_service_pb2.WriteEventsResponse, offset: int
) -> None:
    for result in part.results:
        result.index += offset
    total.results.extend(part.results)
    total.accepted += part.accepted
    total.duplicates += part.duplicates
    total.rejected += part.rejected
    total.suppressed += part.suppressed


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def resolve_client_ip(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The IP of the device that made the request.

    X-Forwarded-For is read only when the socket peer is a trusted proxy, and then from the
    right (the hop our proxy saw) leftwards, skipping trusted proxies: the first untrusted
    address is the client. Entries left of it were written by the client and could be forged.
    """
    addr = _ip(peer or "")
    if addr is None:
        return peer or ""
    if not trusted or not forwarded_for or not any(addr in net for net in trusted):
        return str(addr)
    hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        hop_addr = _ip(hop)
        if hop_addr is None:
            break  # garbage: believe nothing beyond the last proxy we trust
        addr = hop_addr
        if not any(addr in net for net in trusted):
            break
    return str(addr)


@dataclass
class Answer:
    """What to answer a request that carried events."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, {"code": code, "message": message}, headers or {})


_SUCCESS = Answer(200, {"success": True})


class Gateway:
    """The handlers; holds the ingest stubs and the settings, nothing per request."""

    def __init__(
        self,
        stub: IngestWriter,
        health: health_pb2_grpc.HealthStub,
        settings: GatewaySettings,
    ) -> None:
        self.stub = stub
        self.health_stub = health
        self.settings = settings

    # -- the tracking API ------------------------------------------------------------------

    def api_handler(self, route: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            answer = await self.api(request, route)
            return web.Response(
                body=orjson.dumps(answer.body),
                status=answer.status,
                headers=answer.headers,
                content_type="application/json",
            )

        return handle

    async def api(self, request: web.Request, route: str) -> Answer:
        try:
            data = await read_body(request)
            body = segment.parse_json_object(data)
            translation = segment.translate(body, route, len(data))
        except RequestError as err:
            log.info("request refused", extra={"route": route, "code": err.code, "reason": err.message})
            return _error(400, err.code, err.message)
        write_key = segment.write_key_from_authorization(request.headers.get("Authorization"))
        return await self.write(translation, write_key or translation.write_key, self.client_ip(request))

    async def pixel(self, request: web.Request) -> web.Response:
        """GET /v1/pixel/{type}?data=<base64 JSON>: always the GIF, whatever happened, because
        a broken image in an email is worse than a lost open; failures go to logs and metrics."""
        type_name = request.match_info["type"]
        try:
            if type_name not in segment.EVENT_TYPES:
                raise RequestError("unknown_type", f"no pixel route for {type_name[:40]!r}")
            body = segment.decode_pixel_data(request.query.get("data"))
            translation = segment.translate_single(body, type_name, 0)
        except RequestError as err:
            answer = _error(400, err.code, err.message)
        else:
            write_key = segment.write_key_from_authorization(request.headers.get("Authorization"))
            answer = await self.write(
                translation, write_key or translation.write_key, self.client_ip(request)
            )
        if answer.status != 200:
            log.warning(
                "pixel event not stored",
                extra={"type": type_name[:40], "status": answer.status, "answer": answer.body},
            )
        request[_METRIC_CODE] = answer.status
        return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=_PIXEL_HEADERS)

    def client_ip(self, request: web.Request) -> str:
        return resolve_client_ip(
            request.remote, request.headers.getall("X-Forwarded-For", []), self.settings.trusted_proxies
        )

    async def write(self, translation: Translation, write_key: str, client_ip: str) -> Answer:
        """Sends the translated events to ingest and turns its answer into the HTTP answer."""
        if not write_key:
            MESSAGES.labels("failed").inc(translation.total)
            return _error(
                401,
                "missing_write_key",
                "no write key: send it as the HTTP Basic user name (empty password) "
                "or as writeKey in the body",
            )
        # Sent even when no message could be translated: ingest still checks the write key, so
        # a bad key is a 401 whatever the messages look like.
        request = translation.request
        request.write_key = write_key
        request.client_ip = client_ip
        try:
            response = await self.stub.WriteEvents(request, timeout=self.settings.ingest_timeout_seconds)
        except grpc.RpcError as err:
            MESSAGES.labels("failed").inc(len(translation.messages))
            MESSAGES.labels("invalid").inc(len(translation.errors))
            return _rpc_error(err)
        outcome = segment.merge_results(translation, response)
        MESSAGES.labels("accepted").inc(outcome.accepted)
        MESSAGES.labels("duplicate").inc(outcome.duplicates)
        MESSAGES.labels("invalid").inc(len(translation.errors))
        MESSAGES.labels("rejected").inc(response.rejected)
        MESSAGES.labels("suppressed").inc(outcome.suppressed)
        if not outcome.errors:
            return _SUCCESS
        first = outcome.errors[0]
        bad = len({e.index for e in outcome.errors})
        stored = outcome.accepted + outcome.duplicates
        what = "the message was" if translation.total == 1 else f"{bad} of {translation.total} messages were"
        message = f"{what} not stored"
        if stored:
            message += f" ({stored} stored)"
        message += f"; message {first.index}: {first.field or 'message'}: {first.reason}: {first.description}"
        return Answer(
            400,
            {
                "code": "invalid_messages",
                "message": message,
                "accepted": outcome.accepted,
                "duplicates": outcome.duplicates,
                "errors": [e.to_json() for e in outcome.errors],
            },
        )

    # -- operations ------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """200 when ingest's grpc.health.v1 says SERVING; the gateway alone is of no use."""
        try:
            reply = await self.health_stub.Check(
                health_pb2.HealthCheckRequest(service=INGEST_SERVICE),
                timeout=self.settings.health_timeout_seconds,
            )
        except grpc.RpcError as err:
            status = f"ingest unreachable: {_code(err).name}"
        else:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return web.json_response({"status": "ok"})
            status = "ingest not serving: " + health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return web.json_response({"status": "unavailable", "detail": status}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _code(err: grpc.RpcError) -> grpc.StatusCode:
    code = err.code() if hasattr(err, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _rpc_error(err: grpc.RpcError) -> Answer:
    """Ingest's request-level error as the HTTP answer Segment's clients understand."""
    try:
        details = details_of(err)
    except ValueError:  # rich details that disagree with the status: keep the plain code
        details = ErrorDetails(code=_code(err), message="")
    code = details.code
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return _error(401, "invalid_write_key", details.message or "the write key is unknown or disabled")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        seconds = details.retry_after_seconds or 1.0
        log.warning("ingest is shedding load", extra={"retry_after": seconds, "reason": details.reason})
        return _error(
            429,
            "rate_limited",
            details.message or "too many events right now; retry later",
            {"Retry-After": str(max(1, math.ceil(seconds)))},
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        reason = {"REQUEST_TOO_LARGE": "body_too_large", "BATCH_TOO_LARGE": "too_many_messages"}.get(
            details.reason, details.reason.lower() or "invalid_request"
        )
        return _error(400, reason, details.message)
    if code in _RETRYABLE:
        log.warning("ingest unavailable", extra={"grpc_code": code.name, "detail": details.message})
        return _error(503, "unavailable", "the event store is unavailable; retry later")
    log.error("ingest failed", extra={"grpc_code": code.name, "detail": details.message})
    return _error(500, "internal", "the event store failed; retry later")


async def read_body(request: web.Request) -> bytes:
    """The request body, decompressed, at most MAX_BODY_BYTES: read chunk by chunk so that an
    oversize body is refused without being held in memory."""
    media = (request.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if media not in _JSON_TYPES:
        raise RequestError(
            "unsupported_content_type", f"Content-Type must be application/json or text/plain, got {media!r}"
        )
    encoding = (request.headers.get("Content-Encoding") or "").strip().lower()
    gzipped = encoding in _GZIP
    if encoding not in ("", "identity") and not gzipped:
        raise RequestError(
            "unsupported_encoding", f"Content-Encoding must be gzip or none, got {encoding[:40]!r}"
        )
    too_large = RequestError("body_too_large", f"the body is larger than the limit of {MAX_BODY_BYTES} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)
    except RequestPayloadError as exc:  # broken chunked encoding, a body cut short
        raise RequestError("invalid_body", f"the body could not be read: {exc}") from None
    data = b"".join(chunks)
    return segment.gunzip(data, MAX_BODY_BYTES) if gzipped else data


@web.middleware
async def observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Counts and times every request by route template (never the raw path: unbounded), and
    answers JSON 500 for an unexpected exception."""
    start = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    code = 500
    try:
        response = await handler(request)
        code = response.status
        return response
    except web.HTTPException as exc:
        code = exc.status
        raise
    except Exception:
        log.exception("unhandled error", extra={"route": route})
        return web.json_response(
            {"code": "internal", "message": "internal error; see the gateway log"}, status=500
        )
    finally:
        REQUESTS.labels(route, str(request.get(_METRIC_CODE, code))).inc()
        REQUEST_SECONDS.labels(route).observe(time.perf_counter() - start)


async def _add_cors(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v1/"):
        response.headers.update(_CORS_HEADERS)


async def _preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=_PREFLIGHT_HEADERS)


def build_app(
    stub: IngestWriter | ingest_service_pb2_grpc.IngestServiceStub,
    settings: GatewaySettings,
    *,
    health: health_pb2_grpc.HealthStub,
    read_api: ReadApi | None = None,
) -> web.Application:
    """The aiohttp application. The stubs share the process's one channel to ingest.

    Serve it with `serve()`: it turns off aiohttp's own request decompression, without which a
    gzip body would be inflated before our size cap could apply."""
    writer = stub if isinstance(stub, IngestWriter) else IngestWriter([stub])
    gateway = Gateway(writer, health, settings)
    app = web.Application(middlewares=[observe])
    for route in (*segment.SINGLE_ROUTES, *segment.BATCH_ROUTES):
        app.router.add_post(f"/v1/{route}", gateway.api_handler(route))
    # No HEAD: link scanners probe with it, and it must not record an open.
    app.router.add_get("/v1/pixel/{type}", gateway.pixel, allow_head=False)
    app.router.add_route("OPTIONS", "/v1/{path:.*}", _preflight)
    app.on_response_prepare.append(_add_cors)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/metrics", gateway.metrics)
    if read_api is not None:
        add_read_routes(app, read_api)
    return app


@dataclass
class GatewayServer:
    """A started HTTP server: its port, and how to stop it."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stops accepting, lets in-flight requests finish (up to the shutdown timeout)."""
        await self.runner.cleanup()


async def serve(app: web.Application, settings: GatewaySettings) -> GatewayServer:
    """Listens on settings.listen (port 0: any free port)."""
    host, port = parse_listen(settings.listen)
    runner = web.AppRunner(
        app,
        # Bodies are decompressed by read_body() with a size cap (gzip bombs).
        auto_decompress=False,
        # Requests are counted and timed in /metrics; a log line per event batch is noise.
        access_log=None,
        shutdown_timeout=settings.shutdown_grace_seconds,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    log.info("serving", extra={"host": host, "port": bound, "ingest": settings.ingest_addr})
    return GatewayServer(runner, host, bound)
