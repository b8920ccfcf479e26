"""The identity consumer's narrow read of the log (domain.LOG_COLUMNS: of the context only
traits, device, externalIds, os and a string userAgent, each row observed by
domain.observe_row) observes exactly what the extractor takes from whole events, odd shapes
included. Real Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from services.identity.domain import LOG_COLUMNS, Extractor, Rules, observe_row
from services.ingest.app import MIGRATIONS as INGEST_MIGRATIONS
from services.ingest.store import create_source, ensure_partitions, write_rows
from touchpoint.platform.db import migrate
from touchpoint.platform.eventlog import LogEvent, read_batch_sql

T0 = datetime(2026, 5, 2, tzinfo=UTC)
SPACE = "identity-narrow"

# A browser's context as analytics.js sends it: most of it is nothing identity reads.
BROWSER = {
    "library": {"name": "analytics.js", "version": "next-1.64.0"},
    "page": {"path": "/pricing", "url": "https://toast.example/pricing?utm_source=google"},
    "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7)",
    "locale": "en-US",
    "campaign": {"source": "google", "medium": "cpc"},
    "screen": {"width": 1512, "height": 982},
}
CONTEXTS: list[Any] = [
    BROWSER,
    {**BROWSER, "traits": {"email": " Ctx@Example.COM ", "phone": "(650) 253-0000", "crm_id": 7}},
    {"device": {"id": "dev-1", "advertisingId": "idfa-1", "token": "push-1", "type": "ios",
                "model": "iPhone15,2", "manufacturer": "Apple"},
     "os": {"name": "iOS", "version": "17.1"}},
    {"externalIds": [{"id": "cus_9", "type": "Stripe_Customer_ID"}, {"id": "x"}, "junk", {"type": "a b"}]},
    # Odd shapes: what is not an object or a list where one is expected gives nothing.
    {"device": "dev-as-text", "os": ["iOS"], "userAgent": 5, "traits": "t", "externalIds": {"id": "e"}},
    {"device": None, "os": None, "userAgent": None, "traits": None},
    {"device": {"id": "  "}, "userAgent": "", "os": {"name": 3, "version": ""}},
    {"traits": {"email": "null"}, "device": {"id": "undefined", "advertisingId": "00000000-0000-0000-0000-000000000000"}},
    {},
    None,
]  # fmt: skip


def _j(value: Any) -> bytes | None:
    return None if value is None else orjson.dumps(value)


def _rows(source: str) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for i, ctx in enumerate(CONTEXTS):
        for user, traits in ((None, None), (f"u{i}", {"email": f"p{i}@toast.example", "crm_id": i})):
            n = len(out)
            ts = T0 + timedelta(minutes=n)
            out.append(
                (SPACE, source, f"nr{n}", "identify" if traits else "page", user, f"a{i}", None, None,
                 None, None, ts, ts, None, ts, None, _j(traits), _j(ctx), None, None, None)
            )  # fmt: skip
    return out


async def test_narrow_read_observes_what_whole_events_give(pool: asyncpg.Pool) -> None:
    await migrate(pool, "ingest", INGEST_MIGRATIONS)
    await ensure_partitions(pool)
    await pool.execute("delete from ingest.events where space_id = $1", SPACE)
    source = await create_source(pool, write_key="wk_identity_narrow", name="narrow", space_id=SPACE)
    extractor = Extractor(trait_keys=("crm_id",))
    rules = Rules()
    async with pool.acquire() as conn:
        await write_rows(conn, _rows(source))
        where = f"and e.space_id = '{SPACE}' order by"
        narrow = await conn.fetch(read_batch_sql(LOG_COLUMNS).replace("order by", where), "0", 0, 1000)
        full = [
            LogEvent.from_record(r)
            for r in await conn.fetch(read_batch_sql().replace("order by", where), "0", 0, 1000)
        ]
    assert len(narrow) == len(full) == 2 * len(CONTEXTS)
    seen_kinds: set[str] = set()
    attrs: list[dict[str, str]] = []
    for r, whole in zip(narrow, full, strict=True):
        got = observe_row(extractor, rules, r)  # as the consumer reads each row
        want = extractor.observe(whole, rules)
        assert got == want, whole.message_id
        assert got is not None
        seen_kinds.update(k for k, _ in got.idents)
        attrs.append(got.device)
    # The cases above do reach every member the narrow read carries.
    assert {"email", "phone", "crm_id", "device_id", "advertising_id", "push_token",
            "stripe_customer_id", "user_id", "anonymous_id"} <= seen_kinds  # fmt: skip
    assert {"type": "ios", "model": "iPhone15,2", "manufacturer": "Apple", "os_name": "iOS",
            "os_version": "17.1"} in attrs  # fmt: skip
    assert {"user_agent": BROWSER["userAgent"]} in attrs
