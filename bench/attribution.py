"""bench/attribution: the models beside ChannelAttribution, and end to end from Postgres.

    python -m bench.attribution [--journeys N] [--events N] [--skip-models] [--skip-e2e]

(a) Models: N synthetic journeys (default 1,000,000) as "a > b > c" path strings with
conversions, values and nulls, the input ChannelAttribution takes. Timed on the same journeys in
the same run: ChannelAttribution.heuristic_models (first, last, linear) against ours (aggregate
identical paths, then the same three models), and ChannelAttribution.markov_model (order 1,
Monte-Carlo at its defaults) against our exact absorbing-chain solve. Prints each time ratio
ours/theirs (target ≤ 1.0) and how far their simulated credit is from the exact one.
ChannelAttribution is GPL: it is only imported here and in tests, never by the product.

(b) End to end: N events (default 1,000,000) of synthetic profiles (landing pages with UTM
parameters and ad click ids, internal pages, product views, orders) written into the event log
with ingest's own store function, then the attribution consumer catches up from the log (the
live consumer's own columns, apply and memo, in batches of 20,000), then GetCampaignReport (by
campaign/source/medium, last non-direct and Markov) over a real gRPC channel. Prints the
catch-up time, each report's time, and the total (target ≤ 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import numpy as np
import orjson

from bench.common import bench_postgres
from services.attribution import models as m
from services.attribution import store as attribution_store
from services.attribution.app import MIGRATIONS as ATTRIBUTION_MIGRATIONS
from services.attribution.app import AttributionSettings, live_apply, start_attribution
from services.ingest.store import create_source, ensure_partitions, write_rows
from touchpoint.attribution.v1 import attribution_service_pb2 as pb
from touchpoint.attribution.v1 import attribution_service_pb2_grpc as pb_grpc
from touchpoint.platform.db import create_pool, migrate
from touchpoint.platform.eventlog import LogConsumer
from touchpoint.platform.testing import create_database

CHANNELS = np.array(
    ["paid_search", "paid_social", "display", "email", "push", "organic_search", "organic_social", "referral",
     "affiliate", "direct"]
)  # fmt: skip
CHANNEL_P = np.array([0.15, 0.15, 0.10, 0.12, 0.05, 0.13, 0.08, 0.07, 0.05, 0.10])


def synthetic_journeys(n: int, seed: int = 1) -> tuple[list[str], Any, Any, Any]:
    """n journeys: geometric lengths (mean ≈ 2.9, at most 12), conversion more likely on longer
    paths and with paid search in them."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(0.35, n), 12)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.choice(len(CHANNELS), int(offsets[-1]), p=CHANNEL_P)
    names = CHANNELS[ids].tolist()
    paths = [" > ".join(names[offsets[i] : offsets[i + 1]]) for i in range(n)]
    has_search = np.add.reduceat((ids == 0).astype(np.int64), offsets[:-1]) > 0
    conv = (rng.random(n) < 0.03 + 0.015 * lengths + 0.03 * has_search).astype(np.int64)
    value = conv * rng.integers(5, 300, n).astype(np.float64)
    return paths, conv, value, 1 - conv


def bench_models(n: int) -> None:
    import ChannelAttribution as ca  # GPL: bench and tests only
    import pandas as pd

    print(f"models: {n:,} journeys")
    paths, conv, value, null = synthetic_journeys(n)
    data = pd.DataFrame({"path": paths, "conv": conv, "value": value, "null": null})
    print(f"  unique paths: {data['path'].nunique():,}")

    t = time.perf_counter()
    theirs_h = ca.heuristic_models(data, "path", "conv", var_value="value", sep=">", flg_pro=False)
    t_ca_h = time.perf_counter() - t
    t = time.perf_counter()
    table = m.Paths.from_strings(paths, conv, value, null, sep=">")
    ours_h = {x: m.heuristic(table, x) for x in (m.Model.FIRST_TOUCH, m.Model.LAST_TOUCH, m.Model.LINEAR)}
    t_ours_h = time.perf_counter() - t
    t = time.perf_counter()
    for x in (m.Model.LAST_NON_DIRECT, m.Model.POSITION_BASED):
        m.heuristic(table, x)
    t_more = time.perf_counter() - t
    theirs_first = dict(zip(theirs_h["channel_name"], theirs_h["first_touch_conversions"], strict=True))
    ours_first = ours_h[m.Model.FIRST_TOUCH].as_dict()
    diff_h = max(abs(ours_first[k][0] - v) for k, v in theirs_first.items())
    print(
        f"  heuristics (first, last, linear): ChannelAttribution {t_ca_h:.2f} s, ours {t_ours_h:.2f} s "
        f"(aggregation included) -> ratio ours/theirs {t_ours_h / t_ca_h:.2f}; max |Δ first-touch| {diff_h:.2e}; "
        f"last-non-direct + position-based {t_more:.3f} s more"
    )

    t = time.perf_counter()
    theirs_m = ca.markov_model(
        data,
        "path",
        "conv",
        var_value="value",
        var_null="null",
        order=1,
        sep=">",
        verbose=False,
        flg_pro=False,
    )
    t_ca_m = time.perf_counter() - t
    t = time.perf_counter()
    table = m.Paths.from_strings(paths, conv, value, null, sep=">")
    exact = m.markov(table, 1).attribution().as_dict()
    t_ours_m = time.perf_counter() - t
    theirs_credit = dict(zip(theirs_m["channel_name"], theirs_m["total_conversions"], strict=True))
    rel = max(abs(theirs_credit[k] - exact[k][0]) / exact[k][0] for k in theirs_credit)
    print(
        f"  Markov order 1: ChannelAttribution (simulation, defaults) {t_ca_m:.2f} s, ours (exact) "
        f"{t_ours_m:.2f} s (aggregation included) -> ratio ours/theirs {t_ours_m / t_ca_m:.2f}; "
        f"their credit off the exact one by up to {rel:.1%}"
    )


# ----------------------------------------------------------------------------------------------
# End to end

CAMPAIGNS = [f"campaign-{i:02d}" for i in range(20)]
SOURCES = [
    ("google", "cpc", "&gclid=G"),
    ("facebook", "paid-social", "&fbclid=F"),
    ("adroll", "display", ""),
    ("customer.io", "email", ""),
    ("twitter", "organic-social", ""),
    ("toastnation", "news", ""),
]
CONTENTS = ["hero", "sidebar", "footer"]


def synthetic_rows(
    n: int, source_id: str, start: datetime, days: int, seed: int = 2
) -> list[tuple[Any, ...]]:
    """n event rows shaped like ingest.events (store.EVENT_COLUMNS) for ≈ n/10 profiles."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(5, n, p=[0.25, 0.35, 0.3, 0.06, 0.04])  # utm page, internal, view, identify, order
    profiles = rng.integers(0, max(1, n // 10), n)
    seconds = np.sort(rng.integers(0, days * 86400, n))
    camp = rng.integers(0, len(CAMPAIGNS), n)
    src = rng.integers(0, len(SOURCES), n)
    cont = rng.integers(0, len(CONTENTS), n)
    revenue = rng.integers(5, 300, n)
    rows = []
    now = datetime.now(UTC)
    for i in range(n):
        p = int(profiles[i])
        ts = start + timedelta(seconds=int(seconds[i]))
        anon = f"a{p}-{p % 3}"
        user = f"u{p}" if p % 2 == 0 else None
        kind = int(kinds[i])
        typ, event, props, ctx, campaign = "page", None, None, None, None
        if kind == 0:
            s, medium, click = SOURCES[int(src[i])]
            c = CAMPAIGNS[int(camp[i])]
            url = f"https://shop.example/?utm_campaign={c}&utm_source={s}&utm_medium={medium}"
            url += f"&utm_content={CONTENTS[int(cont[i])]}{click}"
            ctx = orjson.dumps({"page": {"url": url}})
            campaign = orjson.dumps(
                {"name": c, "source": s, "medium": medium, "content": CONTENTS[int(cont[i])]}
            )
        elif kind == 1:
            ctx = orjson.dumps(
                {"page": {"url": "https://shop.example/p", "referrer": "https://shop.example/"}}
            )
        elif kind == 2:
            typ, event = "track", "Product Viewed"
            props = orjson.dumps({"product_id": f"sku-{i % 500}", "price": 9.5})
        elif kind == 3:
            typ = "identify"
            user = f"u{p}"
        else:
            typ, event = "track", "Order Completed"
            props = orjson.dumps({"order_id": f"o-{i}", "revenue": int(revenue[i]), "currency": "USD"})
        rows.append(
            ("default", source_id, f"m{i}", typ, user, anon, None, None, event, None, ts, ts, None, now,
             props, None, ctx, None, campaign, None)
        )  # fmt: skip
    return rows


async def bench_e2e(n: int) -> None:
    url, handle = bench_postgres()
    admin_url = url
    db_url = await create_database(admin_url, prefix="tp_bench_attr")
    pool = await create_pool(db_url, max_size=8)
    try:
        from services.ingest.app import MIGRATIONS as INGEST_MIGRATIONS

        await migrate(pool, "ingest", INGEST_MIGRATIONS)
        await ensure_partitions(pool)
        source_id = await create_source(pool, write_key="wk_bench_attr", name="bench")
        start = datetime(2026, 3, 1, tzinfo=UTC)
        days = 60
        print(f"end to end: {n:,} events over {days} days")
        t = time.perf_counter()
        rows = synthetic_rows(n, source_id, start, days)
        async with pool.acquire() as conn:
            for i in range(0, len(rows), 50_000):
                await write_rows(conn, rows[i : i + 50_000])
        print(f"  written to the event log in {time.perf_counter() - t:.1f} s (setup, not timed)")
        del rows

        # Statistics as autovacuum would have them on a live system: without them the planner
        # reads the log with a bitmap scan and a sort per batch.
        await pool.execute("analyze ingest.events")
        settings = AttributionSettings.for_tests(consumer_batch_size=20_000)
        await migrate(pool, "attribution", ATTRIBUTION_MIGRATIONS)
        apply_seconds = 0.0
        apply = live_apply(attribution_store.ApplyMemo())

        async def timed_apply(conn: Any, events: Any) -> None:
            nonlocal apply_seconds
            t = time.perf_counter()
            await apply(conn, events)
            apply_seconds += time.perf_counter() - t

        consumer = LogConsumer(pool, schema="attribution", name=attribution_store.LIVE_CONSUMER, apply=timed_apply,
                               batch_size=settings.consumer_batch_size, columns=attribution_store.LOG_COLUMNS,
                               decode=None)  # fmt: skip
        await consumer.ensure()
        t0 = time.perf_counter()
        applied = await consumer.catch_up()
        t_catch = time.perf_counter() - t0
        counts = await pool.fetchrow(
            "select (select count(*) from attribution.touches) t, (select count(*) from attribution.conversions) c"
        )
        assert counts is not None
        print(
            f"  consumer caught up on {applied:,} events in {t_catch:.1f} s ({applied / t_catch:,.0f} events/s): "
            f"{counts['t']:,} touches, {counts['c']:,} conversions; of which attribution's apply "
            f"(touches, conversions, links and their inserts) {apply_seconds:.1f} s, the rest reading the log"
        )
        app = await start_attribution(pool, settings)
        try:
            async with grpc.aio.insecure_channel(
                app.address, options=[("grpc.max_receive_message_length", 64 << 20)]
            ) as ch:
                stub = pb_grpc.AttributionServiceStub(ch)
                q = pb.ReportQuery(
                    group_by=[pb.DIMENSION_CAMPAIGN, pb.DIMENSION_SOURCE, pb.DIMENSION_MEDIUM],
                )
                q.start_time.FromDatetime(start + timedelta(days=30))
                q.end_time.FromDatetime(start + timedelta(days=days))
                total = t_catch
                for name, model in (
                    ("last non-direct", pb.MODEL_LAST_NON_DIRECT),
                    ("Markov", pb.MODEL_MARKOV),
                ):
                    t = time.perf_counter()
                    r = await stub.GetCampaignReport(
                        pb.GetCampaignReportRequest(query=q, model=model), timeout=300
                    )
                    took = time.perf_counter() - t
                    total += took if model == pb.MODEL_LAST_NON_DIRECT else 0.0
                    print(
                        f"  GetCampaignReport ({name}, campaign/source/medium, 30 days): {took:.2f} s, "
                        f"{r.totals.conversions:,} conversions, {len(r.rows)} rows"
                    )
                t = time.perf_counter()
                cmp = await stub.CompareModels(pb.CompareModelsRequest(query=q), timeout=300)
                print(
                    f"  CompareModels (all 8 models): {time.perf_counter() - t:.2f} s, {len(cmp.rows)} rows"
                )
                print(f"  events in Postgres -> campaign report (catch-up + last non-direct report): {total:.1f} s "
                      f"(target ≤ 30 s)")  # fmt: skip
        finally:
            await app.stop()
    finally:
        await pool.close()
        if handle is not None:
            cleanup = getattr(handle, "cleanup", None)
            if cleanup is not None:
                cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--journeys", type=int, default=1_000_000, help="journeys for the model bench")
    parser.add_argument("--events", type=int, default=1_000_000, help="events for the end-to-end bench")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    if not args.skip_models:
        bench_models(args.journeys)
    if not args.skip_e2e:
        asyncio.run(bench_e2e(args.events))


if __name__ == "__main__":
    main()
