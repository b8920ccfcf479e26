"""Pure export rules: which clicks a match attaches, fbc, and the retry schedule."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from services.export import domain
from services.export.domain import Click

T = datetime(2026, 5, 1, 12, tzinfo=UTC)
WINDOW = timedelta(days=90)


def test_most_recent_eligible_click_per_platform() -> None:
    clicks = [
        Click("gclid", "old", T - timedelta(days=91)),  # outside the window
        Click("gclid", "g1", T - timedelta(days=10), {"source": "google"}),
        Click("wbraid", "w1", T - timedelta(days=2)),
        Click("gclid", "after", T + timedelta(minutes=1)),  # after the purchase
        Click("fbclid", "f1", T - timedelta(days=5), {"source": "facebook"}),
        Click("fbclid", "f2", T - timedelta(days=1)),
    ]
    choice = domain.choose_clicks(clicks, T, WINDOW)
    assert choice.google is not None and (choice.google.kind, choice.google.value) == ("wbraid", "w1")
    assert choice.meta is not None and choice.meta.value == "f2"
    assert domain.choose_clicks(clicks, T, timedelta(days=1, hours=1)).google is None


def test_a_click_seen_on_two_devices_counts_from_its_first_sighting() -> None:
    clicks = [Click("fbclid", "f", T - timedelta(days=3)), Click("fbclid", "f", T - timedelta(days=1))]
    choice = domain.choose_clicks(clicks, T, WINDOW)
    assert choice.meta is not None and choice.meta.first_seen == T - timedelta(days=3)
    assert (
        domain.fbc("f", choice.meta.first_seen) == f"fb.1.{int((T - timedelta(days=3)).timestamp() * 1000)}.f"
    )


def test_gclid_wins_a_tie_and_the_campaign_is_the_newest_clicks() -> None:
    clicks = [
        Click("gbraid", "b", T - timedelta(days=1), {"source": "ios"}),
        Click("gclid", "g", T - timedelta(days=1), {"source": "google"}),
        Click("fbclid", "f", T - timedelta(days=4), {"source": "facebook"}),
    ]
    choice = domain.choose_clicks(clicks, T, WINDOW)
    assert choice.google is not None and choice.google.kind == "gclid"
    assert choice.campaign == {"source": "google"}


def test_retry_delays_grow_with_jitter_and_honour_retry_after() -> None:
    rng = random.Random(7)
    delays = [domain.retry_delay(a, base=1.0, cap=60.0, rng=rng) for a in range(1, 10)]
    for attempt, d in enumerate(delays, start=1):
        ceiling = min(60.0, 2 ** (attempt - 1))
        assert ceiling / 2 <= d <= ceiling
    assert domain.retry_delay(1, base=1.0, cap=60.0, retry_after=30.0, rng=rng) == 30.0
