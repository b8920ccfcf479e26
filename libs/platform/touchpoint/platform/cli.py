"""`touchpoint`: the operators' command line.

    python -m touchpoint.platform.cli status
    python -m touchpoint.platform.cli send track --user-id u-42 --event "Order Completed" \\
        --properties '{"revenue": 25}'
    python -m touchpoint.platform.cli profile user_id:u-42
    python -m touchpoint.platform.cli report --from 2026-11-01 --to 2026-12-01 --model linear
    python -m touchpoint.platform.cli import purchases.csv --source pos-eu
    python -m touchpoint.platform.cli dead-letters list
    python -m touchpoint.platform.cli dead-letters replay --destination destinations/meta

Where the services are comes from the environment, each overridable by a flag:
TOUCHPOINT_{INGEST,IDENTITY,ATTRIBUTION,EXPORT}_ADDR (gRPC host:port), TOUCHPOINT_GATEWAY_URL,
and for each service's Prometheus endpoint TOUCHPOINT_<SERVICE>_METRICS_URL, else port
TOUCHPOINT_<SERVICE>_METRICS_PORT (9101-9104, the services' own setting) on the service's host.
The defaults are those of `make run`.

Exit status: 0 on success; 1 when the command ran but found a problem (a service down, a
refused event, rows refused by an import); 2 when it could not run (a bad argument, a service
unreachable or refusing the call).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import grpc
import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from touchpoint.platform.errors import details_of

# The gRPC services, in the order `status` lists them: (name, full gRPC service name).
GRPC_SERVICES = (
    ("ingest", "touchpoint.ingest.v1.IngestService"),
    ("identity", "touchpoint.identity.v1.IdentityService"),
    ("attribution", "touchpoint.attribution.v1.AttributionService"),
    ("export", "touchpoint.export.v1.ExportService"),
)
DEFAULT_ADDRS = {
    "ingest": "127.0.0.1:50051",
    "identity": "127.0.0.1:50052",
    "attribution": "127.0.0.1:50053",
    "export": "127.0.0.1:50054",
}
DEFAULT_METRICS_PORTS = {"ingest": 9101, "identity": 9102, "attribution": 9103, "export": 9104}

# AttributionService's Model and Dimension values, as the command line spells them.
MODELS = (
    "first-touch", "last-touch", "last-non-direct", "linear", "position-based", "time-decay", "markov", "shapley",
)  # fmt: skip
DIMENSIONS = ("campaign", "source", "medium", "content", "term", "channel")


class CliError(Exception):
    """The command cannot run; the message says why (exit status 2)."""


@dataclass(frozen=True)
class Endpoints:
    """Where the services are."""

    # gRPC host:port of each service, by name.
    grpc: Mapping[str, str]
    # The gateway's base URL.
    gateway_url: str
    # Prometheus /metrics URL of each gRPC service, by name.
    metrics: Mapping[str, str]
    # Seconds a call may take.
    timeout: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Endpoints:
        """From TOUCHPOINT_* variables; `overrides` (the command line's flags: grpc and metrics
        by service name, gateway_url, timeout) win where set."""
        env = os.environ if env is None else env
        grpc_flags = overrides.get("grpc") or {}
        metrics_flags = overrides.get("metrics") or {}
        addrs = {
            name: grpc_flags.get(name) or env.get(f"TOUCHPOINT_{name.upper()}_ADDR") or default
            for name, default in DEFAULT_ADDRS.items()
        }
        metrics = {}
        for name, addr in addrs.items():
            url = metrics_flags.get(name) or env.get(f"TOUCHPOINT_{name.upper()}_METRICS_URL")
            if not url:
                port = env.get(f"TOUCHPOINT_{name.upper()}_METRICS_PORT") or str(DEFAULT_METRICS_PORTS[name])
                url = f"http://{_host(addr)}:{port}/metrics"
            metrics[name] = url
        gateway = overrides.get("gateway_url") or env.get("TOUCHPOINT_GATEWAY_URL") or "http://127.0.0.1:8080"
        return cls(
            grpc=addrs,
            gateway_url=gateway.rstrip("/"),
            metrics=metrics,
            timeout=overrides.get("timeout") or 10.0,
        )


def _host(addr: str) -> str:
    """The host of host:port, for reaching the same machine's metrics port (0.0.0.0 is local)."""
    host = addr.rpartition(":")[0] or addr
    return "127.0.0.1" if host in ("", "0.0.0.0", "[::]") else host


# -- output ----------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, indent: str = "") -> str:
    """Rows as aligned text: numbers right-aligned, everything else left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if numeric[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _time(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _rpc_error(service: str, err: grpc.RpcError) -> CliError:
    try:
        d = details_of(err)
    except ValueError:
        return CliError(f"{service}: {err}")
    text = f"{service} answered {d.code.name}"
    if d.reason:
        text += f" {d.reason}"
    if d.message:
        text += f": {d.message}"
    for fld, why in d.violations:
        text += f"\n  {fld}: {why}"
    return CliError(text)


# -- status ----------------------------------------------------------------------------------


@dataclass
class ServiceStatus:
    name: str
    address: str
    health: str
    detail: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    metrics_error: str = ""


async def _grpc_health(name: str, full_name: str, address: str, timeout: float) -> ServiceStatus:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=full_name), timeout=timeout
            )
    except grpc.RpcError as err:
        code = err.code() if hasattr(err, "code") else None
        state = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
        if state in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return ServiceStatus(name, address, "UNREACHABLE", "no answer" if state != "UNAVAILABLE" else "")
        return ServiceStatus(name, address, state, (err.details() or "") if hasattr(err, "details") else "")
    return ServiceStatus(name, address, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def _gateway_health(session: aiohttp.ClientSession, url: str) -> ServiceStatus:
    try:
        async with session.get(url + "/health") as resp:
            body = await resp.read()
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                doc = {}
            detail = str(doc.get("detail", "")) if isinstance(doc, dict) else ""
            return ServiceStatus(
                "gateway", url, "SERVING" if resp.status == 200 else f"HTTP {resp.status}", detail
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return ServiceStatus("gateway", url, "UNREACHABLE", _http_problem(exc))


def _http_problem(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "unreachable"
    if isinstance(exc, TimeoutError):
        return "no answer"
    return str(exc)[:60] or type(exc).__name__


async def _scrape(session: aiohttp.ClientSession, status: ServiceStatus, url: str) -> None:
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                status.metrics_error = f"HTTP {resp.status}"
                return
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        status.metrics_error = _http_problem(exc)
        return
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                status.samples.append((s.name, dict(s.labels), float(s.value)))
    except ValueError as exc:
        status.metrics_error = f"unreadable metrics: {exc}"


async def cmd_status(args: argparse.Namespace, ep: Endpoints, out: TextIO) -> int:
    timeout = aiohttp.ClientTimeout(total=ep.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        grpc_statuses = await asyncio.gather(
            *(_grpc_health(name, full, ep.grpc[name], ep.timeout) for name, full in GRPC_SERVICES)
        )
        gateway = await _gateway_health(session, ep.gateway_url)
        await asyncio.gather(*(_scrape(session, s, ep.metrics[s.name]) for s in grpc_statuses))
    statuses = [gateway, *grpc_statuses]
    rows = []
    for s in statuses:
        metrics = "-" if s.name == "gateway" else (s.metrics_error or "ok")
        rows.append([s.name, s.address, s.health, metrics, s.detail])
    out.write(table(["SERVICE", "ADDRESS", "HEALTH", "METRICS", "DETAIL"], rows) + "\n")

    # A consumer's lag, by consumer name: the platform's per-consumer gauges carry a `consumer`
    # label; a service's own unlabelled gauge (touchpoint_<service>_consumer_lag_*) is named
    # after the service.
    lags: dict[str, dict[str, float]] = {}
    reporters: dict[str, set[str]] = {}
    queued: list[list[Any]] = []
    outbox: dict[str, dict[str, float]] = {}
    for s in grpc_statuses:
        for name, labels, value in s.samples:
            if name.endswith("_consumer_lag_events") or name.endswith("_consumer_lag_seconds"):
                consumer = (
                    labels.get("consumer") or name.removeprefix("touchpoint_").split("_consumer_lag")[0]
                )
                kind = "events" if name.endswith("_events") else "seconds"
                entry = lags.setdefault(consumer, {})
                entry[kind] = max(entry.get(kind, 0.0), value)
                reporters.setdefault(consumer, set()).add(s.name)
            elif name == "touchpoint_ingest_queued_rows" and s.name == "ingest":
                queued.append([s.name, int(value)])
            elif name == "touchpoint_export_outbox_depth" and s.name == "export":
                outbox.setdefault(labels.get("destination", "?"), {})["depth"] = value
            elif name == "touchpoint_export_outbox_oldest_age_seconds" and s.name == "export":
                outbox.setdefault(labels.get("destination", "?"), {})["age"] = value
    out.write("\nconsumer lag\n")
    if lags:
        lag_rows = [
            [
                consumer,
                int(v["events"]) if "events" in v else None,
                v.get("seconds"),
                ",".join(sorted(reporters[consumer])),
            ]
            for consumer, v in sorted(lags.items())
        ]
        out.write(table(["CONSUMER", "EVENTS", "SECONDS", "REPORTED BY"], lag_rows, indent="  ") + "\n")
    else:
        out.write("  (no consumer reports a lag)\n")
    if queued:
        out.write("\ningest queue\n" + table(["SERVICE", "QUEUED ROWS"], queued, indent="  ") + "\n")
    out.write("\nexport outbox\n")
    if outbox:
        box_rows = [
            [dest, int(v["depth"]) if "depth" in v else None, v.get("age")]
            for dest, v in sorted(outbox.items())
        ]
        out.write(table(["DESTINATION", "DEPTH", "OLDEST (s)"], box_rows, indent="  ") + "\n")
    elif grpc_statuses[-1].metrics_error:
        out.write("  (export metrics unreachable)\n")
    else:
        out.write("  (empty)\n")
    return 0 if all(s.health == "SERVING" for s in statuses) else 1


# -- send ------------------------------------------------------------------------------------


def _json_object(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CliError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CliError(f"{flag} must be a JSON object")
    return value


def _write_key(args: argparse.Namespace) -> str:
    key = args.write_key or os.environ.get("TOUCHPOINT_WRITE_KEY", "")
    if not key:
        kept = Path(".data") / "write_key"  # where `make run` keeps the key it generated
        if kept.exists():
            key = kept.read_text().strip()
    if not key:
        raise CliError("no write key: pass --write-key or set TOUCHPOINT_WRITE_KEY")
    return str(key)


def build_message(args: argparse.Namespace) -> dict[str, Any]:
    """The Segment message `send` posts."""
    msg: dict[str, Any] = {
        "type": args.type,
        "messageId": f"cli-{uuid.uuid4()}",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "context": {
            "library": {"name": "touchpoint-cli", "version": "1"},
            **_json_object(args.context, "--context"),
        },
    }
    if args.user_id:
        msg["userId"] = args.user_id
    if args.anonymous_id:
        msg["anonymousId"] = args.anonymous_id
    if not args.user_id and not args.anonymous_id:
        msg["anonymousId"] = f"cli-{uuid.uuid4().hex[:12]}"
    properties = _json_object(args.properties, "--properties")
    traits = _json_object(args.traits, "--traits")
    if args.type == "track":
        if not args.event:
            raise CliError("send track needs --event")
        msg["event"] = args.event
    if args.type == "page":
        if args.name:
            msg["name"] = args.name
        if args.url:
            msg["context"]["page"] = {"url": args.url}
            properties.setdefault("url", args.url)
    if properties:
        msg["properties"] = properties
    if traits:
        msg["traits"] = traits
    return msg


async def cmd_send(args: argparse.Namespace, ep: Endpoints, out: TextIO) -> int:
    key = _write_key(args)
    if args.count < 1 or args.count > 2500:
        raise CliError("--count must be 1 to 2,500")
    messages = [build_message(args) for _ in range(args.count)]
    if args.count == 1:
        url, body = f"{ep.gateway_url}/v1/{args.type}", messages[0]
    else:
        url, body = f"{ep.gateway_url}/v1/batch", {"batch": messages}
    auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    headers = {"Authorization": auth, "Content-Type": "application/json"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ep.timeout)) as session,
            session.post(url, data=orjson.dumps(body), headers=headers) as resp,
        ):
            status, text = resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CliError(
            f"the gateway at {ep.gateway_url} cannot be reached: {exc or type(exc).__name__}"
        ) from None
    try:
        pretty = orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        pretty = text
    out.write(f"POST {url} -> {status}\n{pretty}\n")
    ids = [m["messageId"] for m in messages]
    out.write("messageId: " + (ids[0] if len(ids) == 1 else f"{ids[0]} ... {ids[-1]} ({len(ids)})") + "\n")
    return 0 if status == 200 else 1


# -- profile ---------------------------------------------------------------------------------


async def cmd_profile(args: argparse.Namespace, ep: Endpoints, out: TextIO) -> int:
    from touchpoint.events.v1 import event_pb2
    from touchpoint.identity.v1 import identity_service_pb2 as ipb
    from touchpoint.identity.v1 import identity_service_pb2_grpc as ipb_grpc

    who: str = args.who
    async with grpc.aio.insecure_channel(ep.grpc["identity"]) as channel:
        stub = ipb_grpc.IdentityServiceStub(channel)
        try:
            if who.startswith("profiles/"):
                name = who
            elif ":" in who or "=" in who:
                sep = ":" if ":" in who else "="
                kind, _, value = who.partition(sep)
                resolved = await stub.ResolveProfile(
                    ipb.ResolveProfileRequest(
                        space_id=args.space, identifier=event_pb2.Identifier(kind=kind.strip(), value=value)
                    ),
                    timeout=ep.timeout,
                )
                name = resolved.profile
            else:
                name = f"profiles/{who}"
            profile = (await stub.GetProfile(ipb.GetProfileRequest(name=name), timeout=ep.timeout)).profile
            events: list[event_pb2.Event] = []
            token = ""
            while len(events) < args.events:
                page = await stub.ListProfileEvents(
                    ipb.ListProfileEventsRequest(
                        name=name, page_size=min(1000, args.events - len(events)), page_token=token
                    ),
                    timeout=ep.timeout,
                )
                events.extend(page.events)
                token = page.next_page_token
                if not token:
                    break
        except grpc.RpcError as err:
            raise _rpc_error("identity", err) from None

    out.write(f"{profile.name}  (space {profile.space_id})\n")
    out.write(f"first seen {_time(profile.first_seen_time)}   last seen {_time(profile.last_seen_time)}\n")
    out.write("\nidentifiers\n")
    out.write(
        table(
            ["KIND", "VALUE", "FIRST SEEN", "LAST SEEN"],
            [
                [i.identifier.kind, i.identifier.value, _time(i.first_seen_time), _time(i.last_seen_time)]
                for i in profile.identifiers
            ],
            indent="  ",
        )
        + "\n"
    )
    if profile.traits:
        out.write("\ntraits\n")
        out.write(
            table(
                ["KEY", "VALUE", "SET", "BY"],
                [
                    [t.key, t.value_json.decode(errors="replace"), _time(t.update_time), t.identifier.value]
                    for t in profile.traits
                ],
                indent="  ",
            )
            + "\n"
        )
    if profile.devices:
        out.write("\ndevices\n")
        out.write(
            table(
                ["IDENTIFIER", "TYPE", "MODEL", "OS", "LAST SEEN"],
                [
                    [
                        f"{d.identifier.kind}:{d.identifier.value}",
                        d.type,
                        " ".join(x for x in (d.manufacturer, d.model) if x),
                        " ".join(x for x in (d.os_name, d.os_version) if x),
                        _time(d.last_seen_time),
                    ]
                    for d in profile.devices
                ],
                indent="  ",
            )
            + "\n"
        )
    out.write(
        f"\njourney ({len(events)} event{'s' if len(events) != 1 else ''}{', more exist' if token else ''})\n"
    )
    type_names = {v: k.removeprefix("EVENT_TYPE_").lower() for k, v in event_pb2.EventType.items()}
    rows = []
    for e in events:
        campaign = "/".join(x for x in (e.campaign.name, e.campaign.source, e.campaign.medium) if x)
        rows.append(
            [
                _time(e.timestamp),
                type_names.get(e.type, str(e.type)),
                e.event or e.name,
                e.user_id or e.anonymous_id,
                campaign,
                e.source_id,
                e.message_id,
            ]
        )
    out.write(
        table(["TIME", "TYPE", "EVENT", "WHO", "CAMPAIGN", "SOURCE", "MESSAGE ID"], rows, indent="  ") + "\n"
    )
    return 0


# -- report ----------------------------------------------------------------------------------


def parse_when(text: str, flag: str) -> datetime:
    """A date (YYYY-MM-DD, midnight UTC) or an ISO 8601 time (UTC when no offset)."""
    raw = text.strip()
    if raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise CliError(f"{flag}: {text!r} is not a date (YYYY-MM-DD) or an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def cmd_report(args: argparse.Namespace, ep: Endpoints, out: TextIO) -> int:
    from touchpoint.attribution.v1 import attribution_service_pb2 as apb
    from touchpoint.attribution.v1 import attribution_service_pb2_grpc as apb_grpc

    end = parse_when(args.to, "--to") if args.to else datetime.now(UTC)
    start = parse_when(args.from_, "--from") if args.from_ else end - timedelta(days=30)
    group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
    for g in group_by:
        if g not in DIMENSIONS:
            raise CliError(f"--group-by: {g!r} is not one of {', '.join(DIMENSIONS)}")
    query = apb.ReportQuery(
        space_id=args.space,
        group_by=[apb.Dimension.Value("DIMENSION_" + g.upper()) for g in group_by],
        conversion_events=args.event or [],
        currency=args.currency,
        campaign_filter=args.campaign,
    )
    query.start_time.FromDatetime(start)
    query.end_time.FromDatetime(end)
    model_value = apb.Model.Value("MODEL_" + args.model.upper().replace("-", "_"))
    request = apb.GetCampaignReportRequest(query=query, model=model_value)
    async with grpc.aio.insecure_channel(ep.grpc["attribution"]) as channel:
        try:
            resp = await apb_grpc.AttributionServiceStub(channel).GetCampaignReport(
                request, timeout=ep.timeout
            )
        except grpc.RpcError as err:
            raise _rpc_error("attribution", err) from None
    model = apb.Model.Name(resp.model).removeprefix("MODEL_").lower().replace("_", "-")
    out.write(
        f"campaign report {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC, model {model}, "
        f"currency {args.currency or 'USD'}\n"
    )
    dims = group_by or ["channel"]
    rows = []
    for r in resp.rows:
        values = [getattr(r.dimensions, d) for d in dims]
        spend = r.spend if r.has_spend else None
        rows.append(
            [
                *values,
                round(r.conversions, 2),
                r.revenue,
                spend,
                r.roas if r.has_spend else None,
                r.cpa if r.has_spend else None,
                r.touched_conversions,
            ]
        )
    headers = [d.upper() for d in dims] + ["CONVERSIONS", "REVENUE", "SPEND", "ROAS", "CPA", "TOUCHED"]
    out.write(table(headers, rows) + "\n")
    t = resp.totals
    out.write(
        f"total: {t.conversions} conversions, revenue {t.revenue:,.2f}, spend {t.spend:,.2f}, "
        f"{t.conversions_without_touches} without touches\n"
    )
    return 0


# -- import ----------------------------------------------------------------------------------


async def cmd_import(args: argparse.Namespace, ep: Endpoints, out: TextIO) -> int:
    from zoneinfo import ZoneInfoNotFoundError

    from services.export.importcsv import import_csv, write_errors

    try:
        report = await import_csv(
            Path(args.file),
            address=ep.grpc["export"],
            source=args.source,
            space_id=args.space,
            time_zone=args.time_zone,
            batch_size=max(1, min(args.batch, 10_000)),
            progress=not args.no_progress,
            out=out,
        )
    except (OSError, ValueError, ZoneInfoNotFoundError) as exc:
        raise CliError(f"cannot import: {exc}") from None
    except grpc.RpcError as err:
        raise _rpc_error("export", err) from None
    if args.errors:
        write_errors(Path(args.errors), report)
    return 1 if report.rejected else 0


# -- dead letters ----------------------------------------------------------------------------


def _destination(text: str) -> str:
    return text if not text or text.startswith("destinations/") else f"destinations/{text}"


async def cmd_dead_letters(args: argparse.Namespace, ep: Endpoints, out: TextIO) -> int:
    from touchpoint.export.v1 import export_service_pb2 as epb
    from touchpoint.export.v1 import export_service_pb2_grpc as epb_grpc

    async with grpc.aio.insecure_channel(ep.grpc["export"]) as channel:
        stub = epb_grpc.ExportServiceStub(channel)
        try:
            if args.action == "list":
                letters: list[epb.DeadLetter] = []
                token = ""
                while len(letters) < args.limit:
                    page = await stub.ListDeadLetters(
                        epb.ListDeadLettersRequest(
                            destination=_destination(args.destination),
                            page_size=min(1000, args.limit - len(letters)),
                            page_token=token,
                        ),
                        timeout=ep.timeout,
                    )
                    letters.extend(page.dead_letters)
                    token = page.next_page_token
                    if not token:
                        break
                rows = [
                    [
                        d.name,
                        d.destination,
                        d.order_id,
                        d.reason,
                        d.attempt_count,
                        _time(d.dead_time),
                        d.detail,
                    ]
                    for d in letters
                ]
                out.write(
                    table(
                        ["NAME", "DESTINATION", "ORDER", "REASON", "ATTEMPTS", "DEAD SINCE", "DETAIL"], rows
                    )
                    + "\n"
                )
                more = " (more exist: raise --limit)" if token else ""
                out.write(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}{more}\n")
                return 0
            names = [n if n.startswith("deliveries/") else f"deliveries/{n}" for n in args.names]
            if not names and not args.destination and not args.all:
                raise CliError("say which dead letters to replay: names, --destination, or --all")
            if names and args.all:
                raise CliError("--all replays every dead letter: give names or --all, not both")
            resp = await stub.ReplayDeadLetters(
                epb.ReplayDeadLettersRequest(
                    names=names, destination=_destination(args.destination), request_id=str(uuid.uuid4())
                ),
                timeout=ep.timeout,
            )
        except grpc.RpcError as err:
            raise _rpc_error("export", err) from None
    out.write(f"replayed {resp.replayed} dead letter{'s' if resp.replayed != 1 else ''}\n")
    return 0


# -- main ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="touchpoint",
        description=doc.split("\n")[0],
        epilog="\n".join(doc.split("\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a call may take (default 10)")
    for name in DEFAULT_ADDRS:
        parser.add_argument(
            f"--{name}",
            dest=f"{name}_addr",
            metavar="HOST:PORT",
            help=f"gRPC address of {name} (TOUCHPOINT_{name.upper()}_ADDR)",
        )
        parser.add_argument(
            f"--{name}-metrics",
            dest=f"{name}_metrics",
            metavar="URL",
            help=f"{name}'s /metrics URL (TOUCHPOINT_{name.upper()}_METRICS_URL)",
        )
    parser.add_argument(
        "--gateway", dest="gateway_url", metavar="URL", help="the gateway (TOUCHPOINT_GATEWAY_URL)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("status", help="health of every service, consumer lags, export outbox depth")

    send = sub.add_parser("send", help="send test events through the gateway and print the answer")
    send.add_argument("type", choices=["track", "identify", "page"])
    send.add_argument("--write-key", "-k", default="", help="the source's write key (TOUCHPOINT_WRITE_KEY)")
    send.add_argument("--user-id", default="")
    send.add_argument("--anonymous-id", default="", help="(default: a random one when there is no --user-id)")
    send.add_argument("--event", default="", help="track: the event name")
    send.add_argument("--name", default="", help="page: the page name")
    send.add_argument("--url", default="", help="page: the URL (its UTM parameters become the campaign)")
    send.add_argument("--properties", default="", help="a JSON object")
    send.add_argument("--traits", default="", help="a JSON object")
    send.add_argument("--context", default="", help="a JSON object merged into the context")
    send.add_argument(
        "--count", type=int, default=1, help="send this many (in one /v1/batch when more than 1)"
    )

    profile = sub.add_parser("profile", help="a profile, its identifiers, traits, devices and journey")
    profile.add_argument("who", help="profiles/ID, an ID, or an identifier as KIND:VALUE (user_id:u-42)")
    profile.add_argument("--space", default="default", help="the identity space (for KIND:VALUE)")
    profile.add_argument("--events", type=int, default=50, help="at most this many events of the journey")

    report = sub.add_parser("report", help="a campaign report as a table")
    report.add_argument(
        "--from", dest="from_", default="", help="start (date or ISO time; default 30 days ago)"
    )
    report.add_argument("--to", metavar="WHEN", default="", help="end, exclusive (default now)")
    report.add_argument("--model", choices=MODELS, default="last-non-direct")
    report.add_argument("--group-by", default="campaign", help=f"comma-separated: {', '.join(DIMENSIONS)}")
    report.add_argument("--space", default="default")
    report.add_argument("--currency", default="", help="(default USD)")
    report.add_argument(
        "--event", action="append", help="a conversion event (repeatable; default: the space's)"
    )
    report.add_argument("--campaign", default="", help="only touches of this campaign")

    imp = sub.add_parser("import", help="import offline conversions from a CSV, with a progress bar")
    imp.add_argument("file", help="the CSV (columns: OfflineConversion's field names)")
    imp.add_argument("--source", required=True, help="the system the purchases come from")
    imp.add_argument("--space", default="")
    imp.add_argument("--time-zone", default="", help="IANA zone for times written without an offset")
    imp.add_argument("--batch", type=int, default=1000, help="conversions per request")
    imp.add_argument("--errors", default="", help="also write the per-row report to this CSV")
    imp.add_argument("--no-progress", action="store_true")

    dead = sub.add_parser("dead-letters", help="list or replay the export's dead letters")
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    dl_list = dead_sub.add_parser("list", help="list dead letters, oldest first")
    dl_list.add_argument("--destination", default="", help="only this destination (destinations/ID or ID)")
    dl_list.add_argument("--limit", type=int, default=100)
    dl_replay = dead_sub.add_parser("replay", help="send dead letters again")
    dl_replay.add_argument("names", nargs="*", help="deliveries/ID (or ID) to replay")
    dl_replay.add_argument("--destination", default="", help="every dead letter of this destination")
    dl_replay.add_argument("--all", action="store_true", help="every dead letter of every destination")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, Endpoints, TextIO], Any]] = {
    "status": cmd_status,
    "send": cmd_send,
    "profile": cmd_profile,
    "report": cmd_report,
    "import": cmd_import,
    "dead-letters": cmd_dead_letters,
}


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs one command; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    ep = Endpoints.from_env(
        grpc={name: getattr(args, f"{name}_addr") for name in DEFAULT_ADDRS},
        metrics={name: getattr(args, f"{name}_metrics") for name in DEFAULT_ADDRS},
        gateway_url=args.gateway_url,
        timeout=args.timeout,
    )
    try:
        code: int = asyncio.run(COMMANDS[args.command](args, ep, out))
    except CliError as exc:
        err.write(f"touchpoint {args.command}: {exc}\n")
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
