"""File exports: the Google Ads offline conversion import CSV and a Meta CSV, for accounts that
upload files rather than call an API. One batch becomes one file, written to a temporary name,
flushed to disk and renamed, so a reader never sees half a file."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp

from services.export.destinations.base import (
    DELIVERED,
    BatchResult,
    Outcome,
    Outgoing,
    RowResult,
    all_rows,
    invalid,
    money,
    skip,
)
from services.export.destinations.google_ads import check_click_window

GOOGLE_HEADER = [
    "Google Click ID",
    "Conversion Name",
    "Conversion Time",
    "Conversion Value",
    "Conversion Currency",
]
META_HEADER = [
    "event_id", "event_name", "event_time", "action_source", "email", "phone", "fn", "ln", "ct", "st", "zip",
    "country", "external_id", "fbc", "value", "currency", "order_id",
]  # fmt: skip
_META_KEYS = {"email": "em", "phone": "ph", "fn": "fn", "ln": "ln", "ct": "ct", "st": "st", "zip": "zp",
              "country": "country", "external_id": "external_id"}  # fmt: skip


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_name(prefix: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}.csv"


class GoogleAdsCsv:
    """``Parameters:TimeZone=<tz>`` then one row per click conversion, times in that zone."""

    kind = "google_ads_csv"

    def __init__(
        self, *, directory: str, conversion_name: str, time_zone: str = "UTC", max_batch: int = 2000
    ) -> None:
        try:
            self.zone = ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {time_zone!r}") from exc
        self.directory = Path(directory)
        self.conversion_name = conversion_name
        self.time_zone = time_zone
        self.max_batch = max_batch

    def prepare(self, conv: Outgoing, now: datetime) -> dict[str, Any]:
        if not conv.gclid:
            raise skip("NO_GCLID", "the Google Ads import file takes gclid conversions only")
        check_click_window(conv, now, timedelta(days=90))
        if conv.value is not None and not conv.currency:
            raise invalid("CURRENCY_REQUIRED", "a value needs a currency")
        return {
            "Google Click ID": conv.gclid,
            "Conversion Name": self.conversion_name,
            "Conversion Time": conv.event_time.astimezone(self.zone).strftime("%Y-%m-%d %H:%M:%S"),
            "Conversion Value": "" if conv.value is None else f"{money(conv.value)}",
            "Conversion Currency": conv.currency.upper(),
        }

    def render(self, rows: Sequence[dict[str, Any]]) -> str:
        out = io.StringIO()
        out.write(f"Parameters:TimeZone={self.time_zone}\n")
        writer = csv.DictWriter(out, fieldnames=GOOGLE_HEADER, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    async def send(self, session: aiohttp.ClientSession, rows: Sequence[dict[str, Any]]) -> BatchResult:
        return await _write(self.directory / _file_name("google-ads"), self.render(rows), len(rows))


class MetaCsv:
    """Meta's offline event columns, PII hashed exactly as for the Conversions API."""

    kind = "meta_csv"

    def __init__(self, *, directory: str, max_batch: int = 1000) -> None:
        self.directory = Path(directory)
        self.max_batch = max_batch

    def prepare(self, conv: Outgoing, now: datetime) -> dict[str, Any]:
        if not conv.meta_user_data and not conv.fbc:
            raise skip("NO_USER_DATA", "no customer information to match the buyer with")
        if conv.event_time < now - timedelta(days=62):
            raise invalid("EVENT_TOO_OLD", "Meta takes physical_store events up to 62 days old")
        row = {
            "event_id": conv.order_id,
            "event_name": conv.event_name,
            "event_time": int(conv.event_time.timestamp()),
            "action_source": "physical_store",
            "fbc": conv.fbc,
            "value": "" if conv.value is None else money(conv.value),
            "currency": conv.currency.upper(),
            "order_id": conv.order_id,
        }
        for column, key in _META_KEYS.items():
            row[column] = conv.meta_user_data.get(key, "")
        return row

    def render(self, rows: Sequence[dict[str, Any]]) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=META_HEADER, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()

    async def send(self, session: aiohttp.ClientSession, rows: Sequence[dict[str, Any]]) -> BatchResult:
        return await _write(self.directory / _file_name("meta"), self.render(rows), len(rows))


async def _write(path: Path, text: str, n: int) -> BatchResult:
    try:
        await asyncio.to_thread(_write_atomically, path, text)
    except OSError as exc:
        row = RowResult(Outcome.RETRY, "FILE_WRITE_FAILED", f"{type(exc).__name__}: {exc}"[:500])
        return BatchResult(all_rows(n, row), 0, str(exc)[:500])
    return BatchResult(all_rows(n, DELIVERED), 0, f"wrote {path.name}")
