"""Touches, channels and conversions from events (pure functions of services.attribution.domain)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.attribution import domain as d
from services.attribution import models as m
from touchpoint.platform.eventlog import LogEvent

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def event(type_: str = "page", **kw: Any) -> LogEvent:
    base: dict[str, Any] = dict(
        xid=1, seq=1, space_id="s", source_id="src", message_id="m1", type=type_, user_id=None,
        anonymous_id="a", previous_id=None, group_id=None, event=None, name=None, timestamp=T0,
        received_at=T0, properties={}, traits={}, context={}, campaign={}, click_ids=[],
    )  # fmt: skip
    base.update(kw)
    return LogEvent(**base)


def channel(ev: LogEvent, rules: tuple[d.ChannelRule, ...] = ()) -> str | None:
    facts = d.touch_of(ev)
    return None if facts is None else d.channel_of(facts, rules)


@pytest.mark.parametrize(
    ("medium", "source", "expected"),
    [
        ("cpc", "google", "paid search"),
        ("paid-social", "facebook", "paid social"),
        ("cpm", "facebook", "paid social"),
        ("display", "adroll", "display"),
        ("email", "customer.io", "email"),
        ("push", "braze", "push"),
        ("affiliate", "partnerize", "affiliate"),
        ("organic-social", "twitter", "organic social"),
        ("news", "toastnation", "referral"),
        ("paid-video", "youtube", "video"),
        ("weird", "somewhere", "other"),
    ],
)
def test_default_channel_grouping_from_utm(medium: str, source: str, expected: str) -> None:
    ev = event(campaign={"name": "national-toastday", "source": source, "medium": medium})
    assert channel(ev) == expected


@pytest.mark.parametrize(
    ("kind", "network", "expected"),
    [("gclid", "google", "paid search"), ("fbclid", "meta", "paid social"), ("dclid", "doubleclick", "display"),
     ("msclkid", "microsoft", "paid search"), ("ttclid", "tiktok", "paid social")],
)  # fmt: skip
def test_click_ids_without_utm_are_paid_touches(kind: str, network: str, expected: str) -> None:
    facts = d.touch_of(event(click_ids=[{"kind": kind, "network": network, "value": "x"}]))
    assert facts is not None and facts.kind == "click_id" and facts.network == network
    assert d.channel_of(facts, ()) == expected


@pytest.mark.parametrize(
    ("referrer", "expected"),
    [
        ("https://www.google.co.uk/search?q=toast", "organic search"),
        ("https://duckduckgo.com/", "organic search"),
        ("https://t.co/abc", "organic social"),
        ("https://m.facebook.com/", "organic social"),
        ("https://toastnation.example/best-toast", "referral"),
    ],
)
def test_referrer_classification(referrer: str, expected: str) -> None:
    ev = event(context={"page": {"url": "https://shop.example/", "referrer": referrer}})
    facts = d.touch_of(ev)
    assert facts is not None and facts.kind == "referrer"
    assert d.channel_of(facts, ()) == expected


def test_internal_navigation_is_no_touch_and_no_referrer_is_direct() -> None:
    internal = event(
        context={"page": {"url": "https://shop.example/cart", "referrer": "https://www.shop.example/"}}
    )
    assert d.touch_of(internal) is None
    assert channel(event(context={"page": {"url": "https://shop.example/"}})) == "direct"
    assert d.touch_of(event("track", event="Product Viewed")) is None
    assert d.touch_of(event("identify")) is None


def test_engagement_events_take_the_campaign_from_their_properties() -> None:
    opened = event(
        "track",
        event="Email Opened",
        properties={"campaign": {"name": "national-toastday", "source": "customer.io"}},
    )
    facts = d.touch_of(opened)
    assert facts == d.TouchFacts("email", "national-toastday", "customer.io", "email")
    assert d.channel_of(facts, ()) == "email"
    push = event("track", event="Push Notification Opened", properties={"campaign_name": "toast-push"})
    assert d.touch_of(push) == d.TouchFacts("push", "toast-push", medium="push")
    link = event(
        "track",
        event="Deep Link Clicked",
        properties={
            "url": "toastapp://open?utm_campaign=national-toastday&utm_source=toastnation&utm_medium=news"
        },
    )
    facts = d.touch_of(link)
    assert facts is not None and (facts.kind, facts.source, facts.medium) == (
        "deep_link",
        "toastnation",
        "news",
    )
    assert d.touch_of(event("track", event="Email Delivered", properties={"campaign_name": "x"})) is None


def test_configured_rules_come_before_the_defaults() -> None:
    rules = (
        d.ChannelRule("earned media", medium_in=("News", "pr")),
        d.ChannelRule("partners", referrer_domain_in=("toastnation.example",)),
    )
    assert channel(event(campaign={"source": "toastnation", "medium": "news"}), rules) == "earned media"
    ref = event(
        context={"page": {"url": "https://shop.example/", "referrer": "https://blog.toastnation.example/x"}}
    )
    assert channel(ref, rules) == "partners"
    assert channel(event(campaign={"source": "google", "medium": "cpc"}), rules) == "paid search"
    assert d.ChannelRule.from_dict(rules[0].as_dict()) == rules[0]


def test_conversions_value_currency_and_dedup_key() -> None:
    events = ("Order Completed", "Signed Up")
    order = event(
        "track", event="Order Completed", properties={"order_id": 42, "total": "1,299.50", "currency": "eur"}
    )
    c = d.conversion_of(order, events)
    assert c == d.ConversionFacts("42", "Order Completed", 1299.5, "EUR", False)
    signup = d.conversion_of(event("track", event="Signed Up", message_id="m9"), events)
    assert signup == d.ConversionFacts("m9", "Signed Up", 0.0, "USD", False)
    first_key = event("track", event="Order Completed", properties={"revenue": 5, "value": 7, "total": 9})
    assert d.conversion_of(first_key, events).value == 5  # type: ignore[union-attr]
    store = event(
        "track", event="Order Completed", context={"channel": "offline"}, properties={"order_id": "o"}
    )
    assert d.conversion_of(store, events).offline  # type: ignore[union-attr]
    assert d.conversion_of(event("track", event="Product Viewed"), events) is None
    assert d.conversion_of(event("page"), events) is None


def test_lookback_per_event_is_capped_at_90_days() -> None:
    s = d.SpaceSettings("s", lookback_days={"Signed Up": 7, "Order Completed": 365})
    assert s.lookback_seconds("Signed Up") == 7 * m.DAY_SECONDS
    assert s.lookback_seconds("Order Completed") == 90 * m.DAY_SECONDS
    assert s.lookback_seconds("Other") == 30 * m.DAY_SECONDS


def test_assemble_uses_each_events_window_and_keeps_unconverted_tails() -> None:
    day = m.DAY_SECONDS
    dims = ("c", "s", "m", "(none)", "(none)", "display")
    touches = [
        d.TouchRow("p", 0.0, dims, "utm", "anonymous_id:a"),
        d.TouchRow("p", 20 * day, dims, "utm", "anonymous_id:a"),
        d.TouchRow("p", 40 * day, dims, "utm", "anonymous_id:a"),
        d.TouchRow("q", 5 * day, dims, "utm", "anonymous_id:b"),
    ]
    conversions = [
        d.ConversionRow("o1", "Order Completed", "p", 25 * day, 1.0, "USD", False),
        d.ConversionRow("s1", "Signed Up", "p", 25 * day, 0.0, "USD", False),
    ]
    settings = d.SpaceSettings("s", lookback_days={"Signed Up": 7})
    a = d.assemble(conversions, touches, settings, (5,), null_start=0.0, null_end=50 * day)
    assert a.paths == [[0, 1], [1]]
    assert sorted(a.null_paths) == [[2], [3]]  # p's touch after its last conversion; q never converted
