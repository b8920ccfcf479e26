"""The read API: profiles (IdentityService) and attribution reports (AttributionService) as
HTTP JSON and CSV, guarded by a read key that is separate from the write keys.

    GET /v1/profiles/resolve?kind=email&value=a@b.c[&space_id=default]
    GET /v1/profiles/{id}
    GET /v1/profiles/{id}/events[?start_time=&end_time=&page_size=&page_token=]
    GET /v1/profiles/{id}/merges[?page_size=&page_token=&include_superseded=true]
    GET /v1/reports/campaigns?model=markov[&group_by=source,medium&start_time=&end_time=
                              &conversion_events=Order Completed&space_id=&format=csv]
    GET /v1/reports/compare[?models=first_touch,markov&...same query...&format=csv]
    GET /v1/conversions/{id}/path[?space_id=&group_by=...]

Reports without start_time/end_time cover the last 30 days up to now.

The read key goes as HTTP Basic user name (empty password) or as `Authorization: Bearer KEY`.
Errors answer {"code", "message"} with the parameter at fault; gRPC errors map to 400/404/503.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import grpc
import orjson
from aiohttp import web
from google.protobuf import json_format, message, timestamp_pb2

from touchpoint.attribution.v1 import attribution_service_pb2 as apb
from touchpoint.attribution.v1 import attribution_service_pb2_grpc as apb_grpc
from touchpoint.events.v1 import event_pb2
from touchpoint.identity.v1 import identity_service_pb2 as ipb
from touchpoint.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from touchpoint.platform.errors import details_of

MODELS = {
    name.removeprefix("MODEL_").lower(): value
    for name, value in apb.Model.items()
    if value != apb.MODEL_UNSPECIFIED
}
DIMENSIONS = {
    name.removeprefix("DIMENSION_").lower(): value
    for name, value in apb.Dimension.items()
    if value != apb.DIMENSION_UNSPECIFIED
}
_TIMEOUT = 30.0
DEFAULT_RANGE_DAYS = 30


class BadParameter(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _json(status: int, body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return _json(status, {"code": code, "message": message, **extra})


def to_json(msg: message.Message) -> dict[str, Any]:
    """A message as JSON with Segment-like names kept (snake_case fields), enums by name, and
    the *_json bytes fields (JSON documents) inlined as JSON under the name without _json."""
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return _inline_json(data)


def _inline_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_inline_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, v in value.items():
        if key.endswith("_json") and isinstance(v, str):
            try:
                out[key.removesuffix("_json")] = orjson.loads(base64.b64decode(v))
            except (ValueError, orjson.JSONDecodeError):
                out[key] = v
        else:
            out[key] = _inline_json(v)
    return out


def _timestamp(request: web.Request, name: str) -> timestamp_pb2.Timestamp | None:
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadParameter(name, f"{name} must be an ISO-8601 time, got {raw[:40]!r}") from exc
    if dt.tzinfo is None:
        raise BadParameter(name, f"{name} needs a time zone (e.g. 2026-11-01T00:00:00Z)")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def _int(request: web.Request, name: str, default: int = 0) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise BadParameter(name, f"{name} must be a whole number, got {raw[:40]!r}")
    return int(raw)


def _list(request: web.Request, name: str) -> list[str]:
    return [p.strip() for v in request.query.getall(name, []) for p in v.split(",") if p.strip()]


def _choices(request: web.Request, name: str, choices: Mapping[str, int]) -> list[int]:
    out = []
    for value in _list(request, name):
        if value.lower() not in choices:
            raise BadParameter(name, f"unknown {name} {value[:40]!r}; one of {', '.join(choices)}")
        out.append(choices[value.lower()])
    return out


def _report_query(request: web.Request) -> apb.ReportQuery:
    query = apb.ReportQuery(
        space_id=request.query.get("space_id", "default"),
        group_by=_choices(request, "group_by", DIMENSIONS),  # type: ignore[arg-type]
        conversion_events=_list(request, "conversion_events"),
        currency=request.query.get("currency", ""),
        campaign_filter=request.query.get("campaign", ""),
    )
    # Without a range, the last 30 days up to now.
    end = _timestamp(request, "end_time")
    if end is None:
        end = timestamp_pb2.Timestamp()
        end.GetCurrentTime()
    start = _timestamp(request, "start_time")
    if start is None:
        start = timestamp_pb2.Timestamp(seconds=end.seconds - DEFAULT_RANGE_DAYS * 86400)
    query.start_time.CopyFrom(start)
    query.end_time.CopyFrom(end)
    return query


class ReadApi:
    def __init__(
        self,
        read_key: str,
        identity: ipb_grpc.IdentityServiceStub | None,
        attribution: apb_grpc.AttributionServiceStub | None,
    ) -> None:
        self.read_key = read_key
        self.identity = identity
        self.attribution = attribution

    def authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = value.strip()
        elif scheme.lower() == "basic":
            try:
                key = base64.b64decode(value.strip()).decode().partition(":")[0]
            except (ValueError, UnicodeDecodeError):
                key = ""
        return bool(key) and hmac.compare_digest(key.encode(), self.read_key.encode())

    def route(
        self, handler: Callable[[web.Request], Awaitable[web.Response]], needs: str
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def wrapped(request: web.Request) -> web.Response:
            if not self.authorised(request):
                return _error(
                    401, "invalid_read_key", "send the read key as HTTP Basic user name or a Bearer token"
                )
            if getattr(self, needs) is None:
                return _error(503, "service_not_configured", f"the {needs} service is not configured")
            try:
                return await handler(request)
            except BadParameter as err:
                return _error(400, "invalid_parameter", err.message, field=err.field)
            except grpc.RpcError as err:
                return _rpc_error(err)

        return wrapped

    # -- profiles --------------------------------------------------------------------------

    async def resolve(self, request: web.Request) -> web.Response:
        assert self.identity is not None
        kind, value = request.query.get("kind", ""), request.query.get("value", "")
        if not kind or not value:
            raise BadParameter("kind" if not kind else "value", "kind and value are required")
        resp = await self.identity.ResolveProfile(
            ipb.ResolveProfileRequest(
                space_id=request.query.get("space_id", "default"),
                identifier=event_pb2.Identifier(kind=kind, value=value),
            ),
            timeout=_TIMEOUT,
        )
        return _json(200, to_json(resp))

    async def profile(self, request: web.Request) -> web.Response:
        assert self.identity is not None
        resp = await self.identity.GetProfile(
            ipb.GetProfileRequest(name=f"profiles/{request.match_info['id']}"), timeout=_TIMEOUT
        )
        return _json(200, to_json(resp))

    async def profile_events(self, request: web.Request) -> web.Response:
        assert self.identity is not None
        req = ipb.ListProfileEventsRequest(
            name=f"profiles/{request.match_info['id']}",
            page_size=_int(request, "page_size"),
            page_token=request.query.get("page_token", ""),
        )
        for name in ("start_time", "end_time"):
            ts = _timestamp(request, name)
            if ts is not None:
                getattr(req, name).CopyFrom(ts)
        resp = await self.identity.ListProfileEvents(req, timeout=_TIMEOUT)
        return _json(200, to_json(resp))

    async def profile_merges(self, request: web.Request) -> web.Response:
        assert self.identity is not None
        resp = await self.identity.ListProfileMerges(
            ipb.ListProfileMergesRequest(
                name=f"profiles/{request.match_info['id']}",
                page_size=_int(request, "page_size"),
                page_token=request.query.get("page_token", ""),
                include_superseded=request.query.get("include_superseded", "") in ("1", "true", "yes"),
            ),
            timeout=_TIMEOUT,
        )
        return _json(200, to_json(resp))

    # -- reports ---------------------------------------------------------------------------

    async def campaign_report(self, request: web.Request) -> web.Response:
        assert self.attribution is not None
        models = _choices(request, "model", MODELS)
        if len(models) != 1:
            raise BadParameter("model", f"one model is required: {', '.join(MODELS)}")
        req = apb.GetCampaignReportRequest(query=_report_query(request), model=models[0])  # type: ignore[arg-type]
        if request.query.get("format") == "csv":
            return await self._csv(apb.ExportReportRequest(campaign_report=req))
        resp = await self.attribution.GetCampaignReport(req, timeout=_TIMEOUT)
        return _json(200, to_json(resp))

    async def compare(self, request: web.Request) -> web.Response:
        assert self.attribution is not None
        req = apb.CompareModelsRequest(
            query=_report_query(request),
            models=_choices(request, "models", MODELS),  # type: ignore[arg-type]
        )
        if request.query.get("format") == "csv":
            return await self._csv(apb.ExportReportRequest(compare_models=req))
        resp = await self.attribution.CompareModels(req, timeout=_TIMEOUT)
        return _json(200, to_json(resp))

    async def conversion_path(self, request: web.Request) -> web.Response:
        assert self.attribution is not None
        resp = await self.attribution.GetConversionPath(
            apb.GetConversionPathRequest(
                space_id=request.query.get("space_id", "default"),
                name=f"conversions/{request.match_info['id']}",
                group_by=_choices(request, "group_by", DIMENSIONS),  # type: ignore[arg-type]
            ),
            timeout=_TIMEOUT,
        )
        return _json(200, to_json(resp))

    async def _csv(self, req: apb.ExportReportRequest) -> web.Response:
        assert self.attribution is not None
        resp = await self.attribution.ExportReport(req, timeout=_TIMEOUT)
        return web.Response(
            text=resp.csv,
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{resp.filename or "report.csv"}"'},
        )


def _rpc_error(err: grpc.RpcError) -> web.Response:
    d = details_of(err)
    status = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 503,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    }.get(d.code, 500)
    body: dict[str, Any] = {"code": (d.reason or d.code.name).lower(), "message": d.message}
    if d.violations:
        body["errors"] = [{"field": f, "description": desc} for f, desc in d.violations]
    return _json(status, body)


def add_read_routes(app: web.Application, api: ReadApi) -> None:
    r = app.router
    r.add_get("/v1/profiles/resolve", api.route(api.resolve, "identity"))
    r.add_get("/v1/profiles/{id}", api.route(api.profile, "identity"))
    r.add_get("/v1/profiles/{id}/events", api.route(api.profile_events, "identity"))
    r.add_get("/v1/profiles/{id}/merges", api.route(api.profile_merges, "identity"))
    r.add_get("/v1/reports/campaigns", api.route(api.campaign_report, "attribution"))
    r.add_get("/v1/reports/compare", api.route(api.compare, "attribution"))
    r.add_get("/v1/conversions/{id}/path", api.route(api.conversion_path, "attribution"))
