"""Matching a buyer to a profile and to the ad clicks that profile made.

The profile comes from the identity service through `ProfileDirectory`: the one small class to
switch when identity's API is preferred to its published view ``identity.profile_identifiers``.
The clicks come from the event log (kept per user_id / anonymous_id in ``export.clicks`` by a
log consumer), so clicks made on another device before the buyer logged in count too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Protocol

import asyncpg

from services.export import domain, store
from services.export.domain import Prepared
from services.export.store import MatchResult

_REASON_BY_KIND = {
    "user_id": "MATCHED_BY_EXTERNAL_ID",
    "email": "MATCHED_BY_EMAIL",
    "phone": "MATCHED_BY_PHONE",
}


class ProfileDirectory(Protocol):
    """Where profiles are looked up."""

    async def available(self, conn: asyncpg.Connection) -> bool: ...

    async def resolve(
        self,
        conn: asyncpg.Connection,
        space_id: str,
        keys: Sequence[tuple[str | None, str | None, str | None]],
    ) -> dict[int, tuple[str, str]]:
        """Index of each (external id, email, phone) -> (profile id, kind that matched)."""
        ...

    async def holders(
        self, conn: asyncpg.Connection, space_id: str, profile_ids: Sequence[str]
    ) -> dict[str, list[tuple[str, str]]]:
        """Profile id -> its (user_id | anonymous_id, value) pairs."""
        ...


class ViewProfileDirectory:
    """Profiles from identity's published view, read in the intake transaction (no extra hop)."""

    def __init__(self, recheck_seconds: float = 5.0) -> None:
        self.recheck_seconds = recheck_seconds
        self._known: tuple[float, bool] = (0.0, False)

    async def available(self, conn: asyncpg.Connection) -> bool:
        now = time.monotonic()
        if self._known[1] or now - self._known[0] > self.recheck_seconds:
            exists = await store.relation_exists(conn, store.IDENTITY_VIEW)
            self._known = (now, exists)
        return self._known[1]

    async def resolve(
        self,
        conn: asyncpg.Connection,
        space_id: str,
        keys: Sequence[tuple[str | None, str | None, str | None]],
    ) -> dict[int, tuple[str, str]]:
        return await store.resolve_profiles(conn, space_id, keys)

    async def holders(
        self, conn: asyncpg.Connection, space_id: str, profile_ids: Sequence[str]
    ) -> dict[str, list[tuple[str, str]]]:
        return await store.profile_holders(conn, space_id, profile_ids)


class Matcher:
    def __init__(self, directory: ProfileDirectory, click_window_days: int = 90) -> None:
        self.directory = directory
        self.window = timedelta(days=min(max(1, click_window_days), domain.MAX_CLICK_WINDOW_DAYS))

    async def match(
        self, conn: asyncpg.Connection, space_id: str, rows: Sequence[Prepared]
    ) -> list[MatchResult]:
        out = [MatchResult(None, domain.UNMATCHED, "NO_IDENTIFIERS") for _ in rows]
        keyed = [i for i, r in enumerate(rows) if r.external_id or r.email or r.phone]
        if keyed and not await self.directory.available(conn):
            for i in keyed:
                out[i] = MatchResult(None, domain.UNMATCHED, "IDENTITY_UNAVAILABLE")
            keyed = []
        if keyed:
            for i in keyed:
                out[i] = MatchResult(None, domain.UNMATCHED, "NO_PROFILE")
            found = await self.directory.resolve(
                conn, space_id, [(rows[i].external_id, rows[i].email, rows[i].phone) for i in keyed]
            )
            profiles = {keyed[j]: hit for j, hit in found.items()}
            holders = await self.directory.holders(conn, space_id, [p for p, _ in profiles.values()])
            lookups: list[tuple[int, str, str]] = []
            since, until = [], []
            for i, (profile_id, _) in profiles.items():
                for kind, value in holders.get(profile_id, []):
                    lookups.append((i, kind, value))
                    since.append(rows[i].event_time - self.window)
                    until.append(rows[i].event_time)
            clicks = await store.clicks_of(conn, space_id, lookups, since, until)
            for i, (profile_id, kind) in profiles.items():
                choice = domain.choose_clicks(clicks.get(i, []), rows[i].event_time, self.window)
                out[i] = MatchResult(
                    profile_id,
                    domain.MATCHED,
                    _REASON_BY_KIND.get(kind, "MATCHED"),
                    google=choice.google,
                    meta_fbc=domain.fbc(choice.meta.value, choice.meta.first_seen) if choice.meta else None,
                    campaign=choice.campaign,
                )
        for i, r in enumerate(rows):
            # Click ids the store captured itself win over the ones found by matching.
            if r.gclid or r.gbraid or r.wbraid:
                out[i].google = None
            if r.fbclid:
                out[i].meta_fbc = domain.fbc(r.fbclid, r.event_time)
        return out
