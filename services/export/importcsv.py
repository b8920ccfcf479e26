"""Imports a CSV of store purchases into the export service, with a progress bar and a per-row
error report.

    python -m services.export.importcsv purchases.csv --source pos-eu [--address HOST:PORT]
        [--space default] [--time-zone Europe/Paris] [--batch 1000] [--errors errors.csv]

Columns are OfflineConversion's field names (order_id, event_name, event_time, time_zone,
value, currency, email, phone, first_name, last_name, city, state, zip, country, external_id,
store_id, gclid, gbraid, wbraid, fbclid, gender, date_of_birth); unknown columns are reported
and ignored. event_time is ISO 8601 (``2026-03-01 14:05:00-05:00``); a time without an offset
is read in the row's time_zone, else in --time-zone, else the row is refused: a guessed time
zone is how conversions end up "before their click".

Exit status: 0 when every row was stored (or was already), 1 when some rows were refused,
2 when the import could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from tqdm import tqdm

from touchpoint.export.v1 import export_service_pb2 as pb
from touchpoint.export.v1 import export_service_pb2_grpc as pb_grpc

TEXT_FIELDS = (
    "order_id", "event_name", "time_zone", "currency", "email", "phone", "first_name", "last_name", "city",
    "state", "zip", "country", "external_id", "store_id", "gclid", "gbraid", "wbraid", "fbclid", "gender",
    "date_of_birth",
)  # fmt: skip
KNOWN = {*TEXT_FIELDS, "event_time", "value"}


@dataclass
class RowProblem:
    row: int
    order_id: str
    field: str
    reason: str
    description: str
    # "error" (row refused) or "warning" (field dropped, row stored).
    severity: str = "error"


@dataclass
class Report:
    rows: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    matched: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)

    @property
    def match_rate(self) -> float:
        return self.matched / self.accepted if self.accepted else 0.0

    def render(self) -> str:
        lines = []
        if self.ignored_columns:
            lines.append(f"ignored unknown columns: {', '.join(self.ignored_columns)}")
        for p in self.problems:
            lines.append(
                f"row {p.row} (order {p.order_id or '?'}): {p.severity} {p.field} {p.reason}: {p.description}"
            )
        lines.append(
            f"rows {self.rows}: accepted {self.accepted}, duplicates {self.duplicates}, rejected {self.rejected}; "
            f"matched {self.matched} of {self.accepted} accepted (match rate {self.match_rate:.1%})"
        )
        return "\n".join(lines)


def parse_time(text: str, zone: str) -> datetime:
    """An aware datetime from ISO 8601; a naive one is read in `zone` (ValueError without)."""
    raw = text.strip()
    if raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    when = datetime.fromisoformat(raw)
    if when.tzinfo is None:
        if not zone:
            raise LookupError("event_time has no UTC offset and no time zone was given")
        when = when.replace(tzinfo=ZoneInfo(zone))
    return when


def to_message(
    row: dict[str, str], default_zone: str
) -> tuple[pb.OfflineConversion | None, list[tuple[str, str, str]]]:
    """The conversion of one CSV row, or the (field, reason, description) that make it unreadable."""
    msg = pb.OfflineConversion()
    for name in TEXT_FIELDS:
        text = (row.get(name) or "").strip()
        if text:
            setattr(msg, name, text)
    problems = []
    zone = msg.time_zone or default_zone
    raw_time = (row.get("event_time") or "").strip()
    if not raw_time:
        problems.append(("event_time", "REQUIRED", "event_time is required"))
    else:
        try:
            when = parse_time(raw_time, zone)
            ts = Timestamp()
            ts.FromDatetime(when)
            msg.event_time.CopyFrom(ts)
        except LookupError as exc:
            problems.append(("event_time", "TIME_ZONE_MISSING", str(exc)))
        except (ValueError, ZoneInfoNotFoundError):
            problems.append(("event_time", "INVALID_TIME", f"{raw_time!r} is not an ISO 8601 time"))
    raw_value = (row.get("value") or "").strip()
    if raw_value:
        try:
            value = float(raw_value)
            if not math.isfinite(value):
                raise ValueError(raw_value)
            msg.value = value
        except ValueError:
            problems.append(("value", "INVALID_VALUE", f"{raw_value!r} is not a number"))
    return (None, problems) if problems else (msg, [])


def load_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a CSV file (a BOM is ignored)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        return header, list(reader)


async def import_csv(
    path: Path,
    *,
    address: str,
    source: str,
    space_id: str = "",
    time_zone: str = "",
    batch_size: int = 1000,
    progress: bool = True,
    out: TextIO | None = None,
) -> Report:
    report = Report()
    if time_zone:
        ZoneInfo(time_zone)  # fails early on a bad name
    header, rows = await asyncio.to_thread(load_csv, path)
    if "order_id" not in header or "event_time" not in header:
        raise ValueError("the CSV needs at least the columns order_id and event_time")
    report.ignored_columns = [h for h in header if h not in KNOWN]
    bar = tqdm(total=len(rows), unit="rows", file=sys.stderr, disable=not progress, desc="importing")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExportServiceStub(channel)
        batch: list[tuple[int, pb.OfflineConversion]] = []
        for line, row in enumerate(rows, start=2):
            report.rows += 1
            msg, problems = to_message(row, time_zone)
            if msg is None:
                report.rejected += 1
                for fld, reason, text in problems:
                    report.problems.append(
                        RowProblem(line, (row.get("order_id") or "").strip(), fld, reason, text)
                    )
                bar.update(1)
                continue
            batch.append((line, msg))
            if len(batch) >= batch_size:
                await _send(stub, batch, source, space_id, report)
                bar.update(len(batch))
                batch = []
        if batch:
            await _send(stub, batch, source, space_id, report)
            bar.update(len(batch))
    bar.close()
    report.problems.sort(key=lambda p: p.row)
    if out is not None:
        out.write(report.render() + "\n")
    return report


async def _send(
    stub: pb_grpc.ExportServiceStub,
    batch: Sequence[tuple[int, pb.OfflineConversion]],
    source: str,
    space_id: str,
    report: Report,
) -> None:
    request = pb.UploadOfflineConversionsRequest(
        source=source, space_id=space_id, conversions=[m for _, m in batch]
    )
    response = await stub.UploadOfflineConversions(request, timeout=120)
    for (line, msg), res in zip(batch, response.results, strict=True):
        for v in res.violations:
            report.problems.append(RowProblem(line, msg.order_id, v.field, v.reason, v.description))
        for v in res.warnings:
            report.problems.append(
                RowProblem(line, msg.order_id, v.field, v.reason, v.description, "warning")
            )
    report.accepted += response.accepted
    report.duplicates += response.duplicates
    report.rejected += response.rejected
    report.matched += response.matched


def write_errors(path: Path, report: Report) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "order_id", "severity", "field", "reason", "description"])
        for p in report.problems:
            writer.writerow([p.row, p.order_id, p.severity, p.field, p.reason, p.description])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.export.importcsv", description=__doc__.split("\n")[0]
    )
    parser.add_argument("file", type=Path, help="the CSV of store purchases")
    parser.add_argument(
        "--source", required=True, help="the system the purchases come from (order ids are unique per source)"
    )
    parser.add_argument("--address", default="127.0.0.1:50054", help="the export service (host:port)")
    parser.add_argument("--space", default="", help="the identity space of the buyers (default: default)")
    parser.add_argument("--time-zone", default="", help="IANA zone for times written without an offset")
    parser.add_argument("--batch", type=int, default=1000, help="conversions per request")
    parser.add_argument("--errors", type=Path, help="also write the per-row report to this CSV")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(
            import_csv(
                args.file,
                address=args.address,
                source=args.source,
                space_id=args.space,
                time_zone=args.time_zone,
                batch_size=max(1, min(args.batch, 10_000)),
                progress=not args.no_progress,
                out=sys.stdout,
            )
        )
    except (OSError, ValueError, ZoneInfoNotFoundError) as exc:
        print(f"cannot import: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"the export service refused or cannot be reached: {exc}", file=sys.stderr)
        return 2
    if args.errors:
        write_errors(args.errors, report)
    return 1 if report.rejected else 0


if __name__ == "__main__":
    sys.exit(main())
