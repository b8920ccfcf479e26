"""AttributionService: the gRPC surface. Validates, reads through the store, calls the domain and
the models, maps errors. No SQL here."""

from __future__ import annotations

import asyncio
import csv
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
import grpc
from google.protobuf import timestamp_pb2

from services.attribution import domain, reports, store
from services.attribution import models as m
from services.attribution.domain import Assembled, ChannelRule, Credit, SpaceSettings
from touchpoint.attribution.v1 import attribution_service_pb2 as pb
from touchpoint.attribution.v1 import attribution_service_pb2_grpc as pb_grpc
from touchpoint.platform.errors import Violation, invalid_argument, not_found

MODEL_OF = {
    pb.MODEL_FIRST_TOUCH: m.Model.FIRST_TOUCH,
    pb.MODEL_LAST_TOUCH: m.Model.LAST_TOUCH,
    pb.MODEL_LAST_NON_DIRECT: m.Model.LAST_NON_DIRECT,
    pb.MODEL_LINEAR: m.Model.LINEAR,
    pb.MODEL_POSITION_BASED: m.Model.POSITION_BASED,
    pb.MODEL_TIME_DECAY: m.Model.TIME_DECAY,
    pb.MODEL_MARKOV: m.Model.MARKOV,
    pb.MODEL_SHAPLEY: m.Model.SHAPLEY,
}
PB_MODEL = {v: k for k, v in MODEL_OF.items()}
TRANSFORM_OF = {
    pb.PATH_TRANSFORM_UNSPECIFIED: m.Transform.UNIQUE,
    pb.PATH_TRANSFORM_UNIQUE: m.Transform.UNIQUE,
    pb.PATH_TRANSFORM_EXPOSURE: m.Transform.EXPOSURE,
    pb.PATH_TRANSFORM_FIRST: m.Transform.FIRST,
    pb.PATH_TRANSFORM_FREQUENCY: m.Transform.FREQUENCY,
}
DIMENSION_OF = {
    pb.DIMENSION_CAMPAIGN: 0,
    pb.DIMENSION_SOURCE: 1,
    pb.DIMENSION_MEDIUM: 2,
    pb.DIMENSION_CONTENT: 3,
    pb.DIMENSION_TERM: 4,
    pb.DIMENSION_CHANNEL: 5,
}
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
_MAX_SPEND_ENTRIES = 10_000
_FAR_PAST = datetime(1970, 1, 1, tzinfo=UTC)
_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Query:
    space_id: str
    start: datetime
    end: datetime
    group_by: tuple[int, ...]
    events: tuple[str, ...]
    settings: m.ModelSettings
    transform: m.Transform
    currency: str
    campaign_filter: str


@dataclass
class Computed:
    query: Query
    report: reports.Report
    credits: dict[m.Model, Credit]
    spend: dict[str, float]
    spend_total: float
    touched: dict[str, int]

    def labels(self) -> list[str]:
        seen: dict[str, None] = {}
        for c in self.credits.values():
            seen.update(dict.fromkeys(c.conversions))
        seen.update(dict.fromkeys(self.spend))
        return list(seen)

    def totals(self) -> pb.ReportTotals:
        r = self.report
        return pb.ReportTotals(
            conversions=r.n_conversions,
            revenue=float(r.conversions.value.sum()),
            spend=self.spend_total,
            conversions_without_touches=r.conversions_without_touches,
        )


def _ts(t: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def _dt(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def model_settings(
    options: pb.ModelOptions, prefix: str, bad: list[Violation]
) -> tuple[m.ModelSettings, m.Transform]:
    s = m.ModelSettings(
        position_first=options.position_first if options.HasField("position_first") else 0.4,
        position_last=options.position_last if options.HasField("position_last") else 0.4,
        half_life_seconds=(options.half_life_days if options.HasField("half_life_days") else 7.0)
        * m.DAY_SECONDS,
        markov_order=options.markov_order if options.HasField("markov_order") else 1,
    )
    for name, problem in s.validate():
        bad.append(Violation(f"{prefix}.{name}", "OUT_OF_RANGE", problem))
    transform = TRANSFORM_OF.get(options.path_transform)
    if transform is None:
        bad.append(Violation(f"{prefix}.path_transform", "UNKNOWN", "unknown path transform"))
        transform = m.Transform.UNIQUE
    return s, transform


def _group_by(values: Sequence[int], field: str, bad: list[Violation]) -> tuple[int, ...]:
    out: list[int] = []
    for v in values or [pb.DIMENSION_CHANNEL]:
        d = DIMENSION_OF.get(v)  # type: ignore[call-overload]
        if d is None:
            bad.append(
                Violation(
                    field,
                    "UNKNOWN_DIMENSION",
                    f"dimension {v} is not one of campaign, source, medium, content, term, channel",
                )
            )
        elif d not in out:
            out.append(d)
    return tuple(out)


class AttributionServicer(pb_grpc.AttributionServiceServicer):
    def __init__(self, pool: asyncpg.Pool, on_recompute: Callable[[], None] = lambda: None) -> None:
        self.pool = pool
        self.on_recompute = on_recompute

    # -- reports ---------------------------------------------------------------------------

    def _query(self, q: pb.ReportQuery, prefix: str = "query") -> tuple[Query, list[Violation]]:
        bad: list[Violation] = []
        if not q.HasField("start_time"):
            bad.append(Violation(f"{prefix}.start_time", "REQUIRED", "start_time is required"))
        if not q.HasField("end_time"):
            bad.append(Violation(f"{prefix}.end_time", "REQUIRED", "end_time is required"))
        start, end = _dt(q.start_time), _dt(q.end_time)
        if q.HasField("start_time") and q.HasField("end_time") and end <= start:
            bad.append(Violation(f"{prefix}.end_time", "BEFORE_START", "end_time must be after start_time"))
        settings, transform = model_settings(q.options, f"{prefix}.options", bad)
        currency = (q.currency or "USD").upper()
        if not _CURRENCY_RE.match(currency):
            bad.append(
                Violation(f"{prefix}.currency", "INVALID", "currency must be an ISO 4217 code like USD")
            )
        events = tuple(e.strip() for e in q.conversion_events if e.strip())
        query = Query(
            q.space_id or "default",
            start,
            end,
            _group_by(q.group_by, f"{prefix}.group_by", bad),
            events,
            settings,
            transform,
            currency,
            q.campaign_filter,
        )
        return query, bad

    async def _compute(self, q: Query, models: Sequence[m.Model]) -> Computed:
        state = await store.space_state(self.pool, q.space_id)
        settings = state.settings
        events = q.events or settings.conversion_events
        use_view = await store.identity_view_exists(self.pool)
        lookback = max(settings.lookback_seconds(e) for e in events)
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            rows = await store.load_report_rows(
                conn,
                q.space_id,
                state.active_generation,
                q.start,
                q.end,
                q.start - timedelta(seconds=lookback),
                events,
                q.group_by,
                use_view,
                q.campaign_filter,
            )
        spend_rows = await store.load_spend(
            self.pool,
            q.space_id,
            q.start.date(),
            (q.end - timedelta(microseconds=1)).date() + timedelta(days=1),
            q.currency,
        )

        def work() -> Computed:
            report = reports.assemble(
                *reports.arrays(rows, settings, q.currency),
                q.group_by,
                null_start=q.start.timestamp(),
                null_end=q.end.timestamp(),
            )
            credits = {
                model: reports.compute_credit(report, model, q.settings, q.transform) for model in models
            }
            return Computed(
                q,
                report,
                credits,
                domain.spend_by_label(q.group_by, spend_rows),
                sum(s.amount for s in spend_rows),
                reports.touched_conversions(report),
            )

        return await asyncio.to_thread(work)

    @staticmethod
    def _dims(c: Computed, label: str) -> pb.DimensionValues:
        return pb.DimensionValues(**c.report.group_dims(label))

    def _report(self, c: Computed, model: m.Model) -> pb.GetCampaignReportResponse:
        credit = c.credits[model]
        rows = []
        for label in c.labels():
            conv = credit.conversions.get(label, 0.0)
            rev = credit.revenue.get(label, 0.0)
            spend = c.spend.get(label)
            rows.append(
                pb.ReportRow(
                    dimensions=self._dims(c, label),
                    conversions=conv,
                    revenue=rev,
                    spend=spend or 0.0,
                    has_spend=spend is not None,
                    roas=rev / spend if spend else 0.0,
                    cpa=spend / conv if spend is not None and conv > 0 else 0.0,
                    touched_conversions=c.touched.get(label, 0),
                )
            )
        rows.sort(key=lambda r: (-r.conversions, -r.revenue))
        return pb.GetCampaignReportResponse(
            rows=rows, totals=c.totals(), model=PB_MODEL[model], allocation=credit.allocation
        )

    def _comparison(self, c: Computed, models: Sequence[m.Model]) -> pb.CompareModelsResponse:
        rows = []
        for label in c.labels():
            spend = c.spend.get(label)
            credits = []
            for model in models:
                conv = c.credits[model].conversions.get(label, 0.0)
                rev = c.credits[model].revenue.get(label, 0.0)
                credits.append(
                    pb.ModelCredit(
                        model=PB_MODEL[model],
                        conversions=conv,
                        revenue=rev,
                        roas=rev / spend if spend else 0.0,
                        cpa=spend / conv if spend is not None and conv > 0 else 0.0,
                    )
                )
            rows.append(
                pb.ComparisonRow(
                    dimensions=self._dims(c, label),
                    spend=spend or 0.0,
                    has_spend=spend is not None,
                    credits=credits,
                )
            )
        rows.sort(key=lambda r: -r.credits[0].conversions if r.credits else 0.0)
        return pb.CompareModelsResponse(rows=rows, totals=c.totals(), models=[PB_MODEL[x] for x in models])

    def _model(self, value: int, field: str, bad: list[Violation]) -> m.Model:
        if value == pb.MODEL_UNSPECIFIED:
            return m.Model.LAST_NON_DIRECT
        model = MODEL_OF.get(value)  # type: ignore[call-overload]
        if model is None:
            bad.append(Violation(field, "UNKNOWN_MODEL", f"model {value} is unknown"))
            return m.Model.LAST_NON_DIRECT
        return model

    async def _campaign_report(self, request: pb.GetCampaignReportRequest) -> pb.GetCampaignReportResponse:
        query, bad = self._query(request.query)
        model = self._model(request.model, "model", bad)
        if bad:
            raise invalid_argument("INVALID_REPORT", "the report request is invalid", bad)
        return self._report(await self._compute(query, [model]), model)

    async def _compare(self, request: pb.CompareModelsRequest) -> pb.CompareModelsResponse:
        query, bad = self._query(request.query)
        models = [self._model(v, "models", bad) for v in request.models] or list(m.ALL_MODELS)
        models = list(dict.fromkeys(models))
        if bad:
            raise invalid_argument("INVALID_REPORT", "the comparison request is invalid", bad)
        return self._comparison(await self._compute(query, models), models)

    async def GetCampaignReport(
        self, request: pb.GetCampaignReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCampaignReportResponse:
        return await self._campaign_report(request)

    async def CompareModels(
        self, request: pb.CompareModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompareModelsResponse:
        return await self._compare(request)

    async def ExportReport(
        self, request: pb.ExportReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExportReportResponse:
        which = request.WhichOneof("report")
        if which is None:
            raise invalid_argument(
                "INVALID_EXPORT",
                "say which report to export",
                [Violation("report", "REQUIRED", "set campaign_report or compare_models")],
            )
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\r\n")
        if which == "campaign_report":
            group_by = _group_by(request.campaign_report.query.group_by, "campaign_report.query.group_by", [])
            report = await self._campaign_report(request.campaign_report)
            dims = [domain.DIMENSIONS[g] for g in group_by]
            w.writerow([*dims, "conversions", "revenue", "spend", "roas", "cpa", "touched_conversions"])
            for r in report.rows:
                w.writerow(
                    [*(getattr(r.dimensions, d) for d in dims), _num(r.conversions), _num(r.revenue),
                     _num(r.spend) if r.has_spend else "", _num(r.roas) if r.has_spend else "",
                     _num(r.cpa) if r.has_spend else "", r.touched_conversions]
                )  # fmt: skip
            name = f"campaign-report-{m.Model(MODEL_OF[report.model]).value}.csv"
        else:
            group_by = _group_by(request.compare_models.query.group_by, "compare_models.query.group_by", [])
            comparison = await self._compare(request.compare_models)
            dims = [domain.DIMENSIONS[g] for g in group_by]
            names = [MODEL_OF[x].value for x in comparison.models]
            w.writerow([*dims, "spend", *(f"{n}_{k}" for n in names for k in ("conversions", "revenue"))])
            for row in comparison.rows:
                w.writerow(
                    [*(getattr(row.dimensions, d) for d in dims), _num(row.spend) if row.has_spend else "",
                     *(x for c in row.credits for x in (_num(c.conversions), _num(c.revenue)))]
                )  # fmt: skip
            name = "model-comparison.csv"
        return pb.ExportReportResponse(csv=out.getvalue(), filename=name)

    # -- one conversion ----------------------------------------------------------------------

    async def GetConversionPath(
        self, request: pb.GetConversionPathRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConversionPathResponse:
        bad: list[Violation] = []
        prefix = "conversions/"
        if not request.name.startswith(prefix) or len(request.name) == len(prefix):
            bad.append(Violation("name", "INVALID_NAME", "name must be conversions/{conversion_id}"))
        group_by = _group_by(request.group_by, "group_by", bad)
        settings, transform = model_settings(request.options, "options", bad)
        if bad:
            raise invalid_argument("INVALID_REQUEST", "the request is invalid", bad)
        conversion_id = request.name[len(prefix) :]
        space_id = request.space_id or "default"
        state = await store.space_state(self.pool, space_id)
        use_view = await store.identity_view_exists(self.pool)
        found = await store.load_conversions(
            self.pool, space_id, state.active_generation, _FAR_PAST, _FAR_FUTURE, (), use_view, conversion_id
        )
        if not found:
            raise not_found("CONVERSION_NOT_FOUND", f"no conversion {request.name}", name=request.name)
        target = found[0]
        t_conv = datetime.fromtimestamp(target.time, tz=UTC)
        fit_start = (
            _dt(request.fit_start_time) if request.HasField("fit_start_time") else t_conv - timedelta(days=90)
        )
        fit_end = (
            _dt(request.fit_end_time)
            if request.HasField("fit_end_time")
            else t_conv + timedelta(microseconds=1)
        )
        fit_start = min(fit_start, t_conv)
        fit_end = max(fit_end, t_conv + timedelta(microseconds=1))
        events = tuple(dict.fromkeys([*state.settings.conversion_events, target.event]))
        conversions = await store.load_conversions(
            self.pool, space_id, state.active_generation, fit_start, fit_end, events, use_view
        )
        lookback = max(state.settings.lookback_seconds(e) for e in events)
        touches = await store.load_touches(
            self.pool,
            space_id,
            state.active_generation,
            fit_start - timedelta(seconds=lookback),
            fit_end,
            use_view,
        )

        def work() -> tuple[Assembled, dict[m.Model, Credit]]:
            a = domain.assemble(
                conversions,
                touches,
                state.settings,
                group_by,
                null_start=fit_start.timestamp(),
                null_end=fit_end.timestamp(),
            )
            return a, {
                model: domain.compute_credit(a, model, settings, transform, target.currency)
                for model in m.ALL_MODELS
            }

        a, credits = await asyncio.to_thread(work)
        k = next(i for i, c in enumerate(a.conversions) if c.conversion_id == conversion_id)
        out_touches = []
        for j, i in enumerate(a.paths[k]):
            t = a.touches[i]
            out_touches.append(
                pb.Touch(
                    touch_time=_ts(datetime.fromtimestamp(t.time, tz=UTC)),
                    dimensions=pb.DimensionValues(**dict(zip(domain.DIMENSIONS, t.dims, strict=True))),
                    kind=t.kind,
                    identifier=t.identifier,
                    credits=[
                        pb.ModelCredit(
                            model=PB_MODEL[model],
                            conversions=credits[model].shares[k][j],
                            revenue=credits[model].shares[k][j] * target.value,
                        )
                        for model in m.ALL_MODELS
                    ],
                )
            )
        return pb.GetConversionPathResponse(
            conversion=pb.Conversion(
                name=request.name,
                event=target.event,
                conversion_time=_ts(t_conv),
                value=target.value,
                currency=target.currency,
                profile=target.profile,
                offline=target.offline,
            ),
            touches=out_touches,
            lookback_days=state.settings.lookback_seconds(target.event) / m.DAY_SECONDS,
        )

    # -- spend -------------------------------------------------------------------------------

    async def ImportSpend(
        self, request: pb.ImportSpendRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImportSpendResponse:
        bad: list[Violation] = []
        if len(request.entries) > _MAX_SPEND_ENTRIES:
            bad.append(Violation("entries", "TOO_MANY", f"at most {_MAX_SPEND_ENTRIES} entries per call"))
        rows: list[tuple[str, date, str, str, str, str, float]] = []
        for i, e in enumerate(request.entries):
            f = f"entries[{i}]"
            if not e.campaign.strip():
                bad.append(Violation(f"{f}.campaign", "REQUIRED", "campaign is required"))
            try:
                day = date.fromisoformat(e.day)
            except ValueError:
                bad.append(Violation(f"{f}.day", "INVALID_DATE", "day must be YYYY-MM-DD"))
                continue
            if not math.isfinite(e.amount) or e.amount < 0:
                bad.append(Violation(f"{f}.amount", "OUT_OF_RANGE", "amount must be a finite number ≥ 0"))
            currency = (e.currency or "USD").upper()
            if not _CURRENCY_RE.match(currency):
                bad.append(
                    Violation(f"{f}.currency", "INVALID", "currency must be an ISO 4217 code like USD")
                )
            rows.append(
                (
                    e.campaign.strip(),
                    day,
                    currency,
                    e.source.strip(),
                    e.medium.strip(),
                    e.content.strip(),
                    e.amount,
                )
            )
        if bad:
            raise invalid_argument("INVALID_SPEND", "some spend entries are invalid; nothing was stored", bad)
        space_id = request.space_id or "default"
        async with self.pool.acquire() as conn, conn.transaction():
            if request.request_id:
                previous = await store.request_seen(conn, space_id, request.request_id)
                if previous is not None:
                    return pb.ImportSpendResponse(stored=int(previous or 0))
            stored = await store.upsert_spend(conn, space_id, rows) if rows else 0
            if request.request_id:
                await store.set_request_result(conn, space_id, request.request_id, str(stored))
        return pb.ImportSpendResponse(stored=stored)

    # -- settings and recomputation ----------------------------------------------------------

    @staticmethod
    def _settings_pb(s: SpaceSettings) -> pb.AttributionSettings:
        return pb.AttributionSettings(
            space_id=s.space_id,
            conversion_events=list(s.conversion_events),
            lookback_windows=[pb.LookbackWindow(event=k, days=v) for k, v in sorted(s.lookback_days.items())],
            default_lookback_days=s.default_lookback_days,
            channel_rules=[pb.ChannelRule(**r.as_dict()) for r in s.channel_rules],
            version=s.version,
        )

    async def GetAttributionSettings(
        self, request: pb.GetAttributionSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AttributionSettings:
        return self._settings_pb((await store.space_state(self.pool, request.space_id or "default")).settings)

    async def UpdateAttributionSettings(
        self, request: pb.UpdateAttributionSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AttributionSettings:
        s = request.settings
        bad: list[Violation] = []
        events = tuple(dict.fromkeys(e.strip() for e in s.conversion_events if e.strip()))
        if not events:
            bad.append(Violation("settings.conversion_events", "REQUIRED", "at least one conversion event"))
        lookback: dict[str, float] = {}
        for i, w in enumerate(s.lookback_windows):
            if not w.event.strip():
                bad.append(
                    Violation(f"settings.lookback_windows[{i}].event", "REQUIRED", "event is required")
                )
            if not 1 <= w.days <= m.MAX_LOOKBACK_DAYS:
                bad.append(
                    Violation(f"settings.lookback_windows[{i}].days", "OUT_OF_RANGE", "days must be 1 to 90")
                )
            lookback[w.event.strip()] = w.days
        default_days = s.default_lookback_days or float(m.DEFAULT_LOOKBACK_DAYS)
        if not 1 <= default_days <= m.MAX_LOOKBACK_DAYS:
            bad.append(Violation("settings.default_lookback_days", "OUT_OF_RANGE", "days must be 1 to 90"))
        rules = []
        for i, r in enumerate(s.channel_rules):
            if not r.channel.strip():
                bad.append(
                    Violation(f"settings.channel_rules[{i}].channel", "REQUIRED", "channel is required")
                )
            rules.append(
                ChannelRule(
                    r.channel.strip(),
                    tuple(r.medium_in),
                    tuple(r.source_in),
                    r.campaign_contains,
                    tuple(r.kind_in),
                    tuple(r.referrer_domain_in),
                )
            )
        if bad:
            raise invalid_argument("INVALID_SETTINGS", "the settings are invalid; nothing was changed", bad)
        state = await store.save_settings(
            self.pool, SpaceSettings(s.space_id or "default", events, lookback, default_days, tuple(rules))
        )
        return self._settings_pb(state.settings)

    @staticmethod
    def _job_pb(row: asyncpg.Record) -> pb.RecomputeJob:
        total = int(row["total_events"])
        processed = min(int(row["processed_events"]), total)
        job = pb.RecomputeJob(
            name=f"recomputeJobs/{row['id']}",
            space_id=row["space_id"],
            state={"running": pb.JOB_STATE_RUNNING, "succeeded": pb.JOB_STATE_SUCCEEDED}.get(
                row["state"], pb.JOB_STATE_FAILED
            ),
            processed_events=processed,
            total_events=total,
            progress=1.0 if row["state"] == "succeeded" else (processed / total if total else 0.0),
            create_time=_ts(row["created_at"]),
            error=row["error"],
        )
        if row["ended_at"] is not None:
            job.end_time.CopyFrom(_ts(row["ended_at"]))
        return job

    async def RecomputeAttribution(
        self, request: pb.RecomputeAttributionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecomputeJob:
        space_id = request.space_id or "default"
        if request.request_id:
            async with self.pool.acquire() as conn, conn.transaction():
                previous = await store.request_seen(conn, space_id, request.request_id)
            if previous:
                row = await store.get_job(self.pool, previous)
                if row is not None:
                    return self._job_pb(row)
        row = await store.start_recompute(self.pool, space_id)
        if request.request_id:
            async with self.pool.acquire() as conn:
                await store.set_request_result(conn, space_id, request.request_id, row["id"])
        self.on_recompute()
        return self._job_pb(row)

    async def GetRecomputeJob(
        self, request: pb.GetRecomputeJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecomputeJob:
        prefix = "recomputeJobs/"
        if not request.name.startswith(prefix):
            raise invalid_argument(
                "INVALID_NAME",
                "name must be recomputeJobs/{id}",
                [Violation("name", "INVALID_NAME", "recomputeJobs/{id}")],
            )
        row = await store.get_job(self.pool, request.name[len(prefix) :])
        if row is None:
            raise not_found("JOB_NOT_FOUND", f"no job {request.name}", name=request.name)
        return self._job_pb(row)


def _num(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".") if math.isfinite(x) else ""
