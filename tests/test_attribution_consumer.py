"""The live consumer's narrow read of the log (store.LOG_COLUMNS, raw records, memoised facts)
derives exactly the touches, conversions and identity links that the rules (domain.touch_of,
channel_of, conversion_of) give on whole events, edge cases included. Real Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from services.attribution import domain, store
from services.attribution.app import MIGRATIONS as ATTRIBUTION_MIGRATIONS
from services.ingest.app import MIGRATIONS as INGEST_MIGRATIONS
from services.ingest.store import create_source, ensure_partitions, write_rows
from touchpoint.platform.db import migrate
from touchpoint.platform.eventlog import LogEvent, read_batch_sql

T0 = datetime(2026, 5, 1, tzinfo=UTC)
SPACE = "narrow"
SITE = "https://toast.example/"


def _j(value: Any) -> bytes | None:
    return None if value is None else orjson.dumps(value)


def row(source: str, i: int, type_: str, **kw: Any) -> tuple[Any, ...]:
    ts = T0 + timedelta(minutes=i)
    return (
        SPACE, source, f"n{i}", type_, kw.get("user"), kw.get("anon", f"a{i}"), kw.get("previous"), None,
        kw.get("event"), None, ts, ts, None, ts, _j(kw.get("properties")), None, _j(kw.get("context")), None,
        _j(kw.get("campaign")), _j(kw.get("click_ids")),
    )  # fmt: skip


def page_ctx(url: str = SITE, referrer: Any = None, **extra: Any) -> dict[str, Any]:
    page: dict[str, Any] = {"url": url}
    if referrer is not None:
        page["referrer"] = referrer
    return {"page": page, **extra}


def events(source: str) -> list[tuple[Any, ...]]:
    utm = {"name": "toastday", "source": "facebook", "medium": "paid-social", "content": "hero"}
    return [
        row(source, 0, "page", context=page_ctx(SITE + "?utm_campaign=toastday"), campaign=utm),
        # A campaign that names no name/source/medium: the referrer decides.
        row(source, 1, "page", context=page_ctx(referrer="https://news.example/a"), campaign={"content": "x"}),
        # Blank, boolean and numeric campaign names.
        row(source, 2, "page", context=page_ctx(), campaign={"name": "   "}),
        row(source, 3, "page", context=page_ctx(referrer="https://www.google.com/"), campaign={"name": True}),
        row(source, 4, "page", context=page_ctx(), campaign={"name": 5, "medium": "email"}),
        # Referrers: not a string, in context.referrer as an object, internal, none.
        row(source, 5, "page", context=page_ctx(referrer=123)),
        row(source, 6, "page", context={"page": {"url": SITE}, "referrer": {"url": "https://t.co/x"}}),
        row(source, 7, "page", context=page_ctx(SITE + "cart", referrer=SITE)),
        row(source, 8, "page", context={"page": "not an object"}),
        row(source, 9, "page"),
        # Engagement, click ids, plain tracks.
        row(source, 10, "track", event="Email Opened", properties={"campaign": {"name": "toastday", "source": "customer.io"}}),
        row(source, 11, "track", event="Push Notification Opened", properties={"campaign_name": "push-1"}),
        row(source, 12, "track", event="Product Viewed", properties={"sku": "a"}),
        row(source, 13, "page", context=page_ctx(), click_ids=[{"kind": "gclid", "network": "google", "value": "G"}]),
        row(source, 14, "track", event="Product Viewed", click_ids=[{"kind": "fbclid", "value": "F"}]),
        # Conversions: in a store, without properties, duplicate order, custom event.
        row(source, 15, "track", user="u1", event="Order Completed",
            properties={"order_id": "o-1", "revenue": "1,250.5", "currency": "eur"}, context={"channel": "store"}),
        row(source, 16, "track", event="Signed Up"),
        row(source, 17, "track", event="Order Completed", properties={"order_id": "o-1", "total": 3}),
        row(source, 18, "track", event="Trial Started", properties={"value": 7}),
        # Identity links: identify, alias, a user whose anonymous id is the user id.
        row(source, 19, "identify", user="u1", anon="a-laptop"),
        row(source, 20, "alias", user="u2", anon=None, previous="a-old"),
        row(source, 21, "identify", user="u3", anon="u3"),
        # The same campaign again: served from the memo.
        row(source, 22, "page", context=page_ctx(SITE + "?utm_campaign=toastday"), campaign=utm),
    ]  # fmt: skip


def expected(
    full: list[LogEvent], settings: domain.SpaceSettings
) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]], set[tuple[str, str]]]:
    touches: set[tuple[Any, ...]] = set()
    conversions: set[tuple[Any, ...]] = set()
    links: set[tuple[str, str]] = set()
    for ev in full:
        facts = domain.touch_of(ev)
        if facts is not None:
            channel = domain.channel_of(facts, settings.channel_rules)
            touches.add((ev.message_id, facts.kind, channel, facts.campaign, facts.source, facts.medium,
                         facts.content, facts.term, facts.network, facts.referrer_domain))  # fmt: skip
        c = domain.conversion_of(ev, settings.conversion_events)
        if c is not None and c.conversion_id not in {x[0] for x in conversions}:
            conversions.add((c.conversion_id, c.event, c.value, c.currency, c.offline, ev.message_id))
        for anon in (ev.anonymous_id, ev.previous_id):
            if ev.user_id and anon and anon != ev.user_id:
                links.add((anon, ev.user_id))
    return touches, conversions, links


@pytest.mark.parametrize("memo", [False, True])
async def test_narrow_read_derives_what_the_rules_give_on_whole_events(
    pool: asyncpg.Pool, memo: bool
) -> None:
    await migrate(pool, "ingest", INGEST_MIGRATIONS)
    await ensure_partitions(pool)
    await migrate(pool, "attribution", ATTRIBUTION_MIGRATIONS)
    await pool.execute("delete from ingest.events where space_id = $1", SPACE)
    for table in ("touches", "conversions", "identity_links", "spaces"):
        await pool.execute(f"delete from attribution.{table} where space_id = $1", SPACE)
    source = await create_source(pool, write_key=f"wk_narrow_{memo}", name="narrow", space_id=SPACE)
    async with pool.acquire() as conn:
        await write_rows(conn, events(source))
        rule = domain.ChannelRule("earned", referrer_domain_in=("news.example",))
        await store.space_states(conn, [SPACE])
        await conn.execute(
            "update attribution.spaces set channel_rules = $2, version = version + 1 where space_id = $1",
            SPACE,
            [rule.as_dict()],
        )
        narrow_sql = read_batch_sql(store.LOG_COLUMNS).replace(
            "order by", "and e.space_id = 'narrow' order by"
        )
        narrow = await conn.fetch(narrow_sql, "0", 0, 1000)
        full_sql = read_batch_sql().replace("order by", "and e.space_id = 'narrow' order by")
        full = [LogEvent.from_record(r) for r in await conn.fetch(full_sql, "0", 0, 1000)]
        assert len(narrow) == len(full) == len(events(source))
        # A conversion event configured after the batch was read: its properties were not sent
        # with the batch and are fetched when it is applied.
        await conn.execute(
            """update attribution.spaces set conversion_events = conversion_events || '{Trial Started}'
               where space_id = $1""",
            SPACE,
        )
        settings = (await store.space_state(conn, SPACE)).settings
        assert narrow[18]["properties"] == ""
        apply_memo = store.ApplyMemo() if memo else None
        async with conn.transaction():
            # In two batches, so that the memo serves the second from what the first derived.
            await store.apply_rows(conn, narrow[:11], memo=apply_memo)
            await store.apply_rows(conn, narrow[11:], memo=apply_memo)
        touches = await conn.fetch(
            """select message_id, kind, channel, campaign, source, medium, content, term, network,
                      referrer_domain from attribution.touches where space_id = $1""",
            SPACE,
        )
        conversions = await conn.fetch(
            """select conversion_id, event, value, currency, offline, message_id
               from attribution.conversions where space_id = $1""",
            SPACE,
        )
        links = await conn.fetch(
            "select anonymous_id, user_id from attribution.identity_links where space_id = $1", SPACE
        )
    want_touches, want_conversions, want_links = expected(full, settings)
    assert {tuple(r) for r in touches} == want_touches
    assert {tuple(r) for r in conversions} == want_conversions
    assert {tuple(r) for r in links} == want_links
    # The cases above are not vacuous: every kind of touch, the rule, the late conversion event.
    assert {t[1] for t in want_touches} == {"utm", "referrer", "direct", "email", "push", "click_id"}
    assert next(t for t in want_touches if t[0] == "n1")[:3] == ("n1", "referrer", "earned")
    assert {c[0] for c in want_conversions} == {"o-1", "n16", "n18"}
    assert want_links == {("a-laptop", "u1"), ("a15", "u1"), ("a-old", "u2")}


async def test_an_orders_earliest_event_wins_whatever_order_the_batches_come_in(pool: asyncpg.Pool) -> None:
    """Replicas apply partitions of the log in any order, and offline conversions race online
    ones: the stored conversion of an order must not depend on it."""
    await migrate(pool, "ingest", INGEST_MIGRATIONS)
    await ensure_partitions(pool)
    await migrate(pool, "attribution", ATTRIBUTION_MIGRATIONS)
    await pool.execute("delete from ingest.events where space_id = $1", SPACE)
    source = await create_source(pool, write_key="wk_narrow_order", name="narrow", space_id=SPACE)
    async with pool.acquire() as conn:
        await write_rows(conn, events(source))
        narrow_sql = read_batch_sql(store.LOG_COLUMNS).replace(
            "order by", "and e.space_id = 'narrow' order by"
        )
        narrow = {r["message_id"]: r for r in await conn.fetch(narrow_sql, "0", 0, 1000)}
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("delete from attribution.conversions where space_id = $1", SPACE)
            # The later event of order o-1 (n17, total 3) first, then the earlier one (n15) ...
            await store.apply_rows(conn, [narrow["n17"]])
            await store.apply_rows(conn, [narrow["n15"]])
            # ... and both in one batch, later one first.
            await store.apply_rows(conn, [narrow["n17"], narrow["n15"]])
            rows = await conn.fetch(
                """select message_id, value, currency, count(*) over () as n from attribution.conversions
                   where space_id = $1 and conversion_id = 'o-1'""",
                SPACE,
            )
        finally:
            await tx.rollback()
    assert [(r["message_id"], r["value"], r["currency"], r["n"]) for r in rows] == [("n15", 1250.5, "EUR", 1)]
