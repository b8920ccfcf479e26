"""ExportService: the gRPC surface. Validates, calls the domain, the matcher and the store, maps
errors. No SQL here."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.export import destinations, domain, metrics, store
from services.export.credentials import CredentialsError, SecretBox
from services.export.matching import Matcher
from services.export.outbox import Claimed, Handoff, handed
from touchpoint.export.v1 import export_service_pb2 as pb
from touchpoint.export.v1 import export_service_pb2_grpc as pb_grpc
from touchpoint.platform.errors import ServiceError, Violation, invalid_argument, not_found

log = logging.getLogger(__name__)

_KIND_NAMES = {
    pb.DESTINATION_KIND_META_CAPI: "meta_capi",
    pb.DESTINATION_KIND_GOOGLE_ADS: "google_ads",
    pb.DESTINATION_KIND_GOOGLE_DATA_MANAGER: "google_data_manager",
    pb.DESTINATION_KIND_GOOGLE_ADS_CSV: "google_ads_csv",
    pb.DESTINATION_KIND_META_CSV: "meta_csv",
}
_KIND_NUMBERS = {v: k for k, v in _KIND_NAMES.items()}
_STATES = {
    "pending": pb.DELIVERY_STATE_PENDING,
    "sending": pb.DELIVERY_STATE_SENDING,
    "delivered": pb.DELIVERY_STATE_DELIVERED,
    "dead": pb.DELIVERY_STATE_DEAD,
    "skipped": pb.DELIVERY_STATE_SKIPPED,
}
_MATCH = {domain.MATCHED: pb.MATCH_STATUS_MATCHED, domain.UNMATCHED: pb.MATCH_STATUS_UNMATCHED}
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MAX_STATUS = 1000
_MAX_REPLAY = 10_000
_UPDATABLE = {
    "display_name", "base_url", "settings", "credentials", "credential_env", "event_names", "enabled",
    "requests_per_second", "max_batch_size",
}  # fmt: skip


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    t = Timestamp()
    t.FromDatetime(value)
    return t


def _resource_id(name: str, collection: str, field: str) -> str:
    prefix = f"{collection}/"
    if not name.startswith(prefix) or not name[len(prefix) :]:
        raise invalid_argument(
            "INVALID_NAME", f"{field} must be {collection}/{{id}}", [Violation(field, "INVALID_NAME", name)]
        )
    return name[len(prefix) :]


def _int_id(name: str, collection: str, field: str) -> int:
    raw = _resource_id(name, collection, field)
    if not raw.isdigit():
        raise invalid_argument(
            "INVALID_NAME",
            f"{field} must be {collection}/{{number}}",
            [Violation(field, "INVALID_NAME", name)],
        )
    return int(raw)


class ExportServicer(pb_grpc.ExportServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        matcher: Matcher,
        box: SecretBox,
        *,
        default_region: str,
        on_enqueued: Callable[[], None],
        on_destinations_changed: Callable[[], None],
        handoff: Handoff | None = None,
    ) -> None:
        self.pool = pool
        self.matcher = matcher
        self.box = box
        self.default_region = default_region
        self.on_enqueued = on_enqueued
        self.on_destinations_changed = on_destinations_changed
        self.handoff = handoff
        self._accepted = 0
        self._matched = 0

    # --- intake ----------------------------------------------------------------------------

    async def UploadOfflineConversions(
        self, request: pb.UploadOfflineConversionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UploadOfflineConversionsResponse:
        bad = []
        source = request.source.strip()
        if not source:
            bad.append(Violation("source", "REQUIRED", "source is required: order ids are unique per source"))
        if len(request.conversions) > domain.MAX_BATCH:
            bad.append(Violation("conversions", "TOO_MANY", f"at most {domain.MAX_BATCH} per request"))
        if bad:
            raise invalid_argument("INVALID_REQUEST", "the request is invalid", bad)
        space_id = request.space_id.strip() or "default"
        now = datetime.now(UTC)
        count = len(request.conversions)
        response = pb.UploadOfflineConversionsResponse()
        results = [response.results.add() for _ in range(count)]
        fresh: list[tuple[int, domain.Prepared]] = []
        seen: dict[str, int] = {}
        repeated: list[tuple[int, int]] = []
        rejected = 0
        for i, msg in enumerate(request.conversions):
            res = results[i]
            res.order_id = msg.order_id
            prepared = domain.prepare(msg, now=now, default_region=self.default_region)
            if isinstance(prepared, list):
                res.outcome = pb.OUTCOME_REJECTED
                rejected += 1
                for v in prepared:
                    res.violations.add(field=v.field, reason=v.reason, description=v.description)
                    metrics.REJECTIONS.labels(v.field, v.reason).inc()
                continue
            for w in prepared.warnings:
                res.warnings.add(field=w.field, reason=w.reason, description=w.description)
            if prepared.order_id in seen:
                res.outcome = pb.OUTCOME_DUPLICATE  # repeated within the request: stored once
                repeated.append((i, seen[prepared.order_id]))
                continue
            seen[prepared.order_id] = i
            fresh.append((i, prepared))

        stored: dict[str, int] = {}
        existing: dict[str, int] = {}
        match_tally: dict[tuple[str, str], int] = {}
        matches: list[store.MatchResult] = []
        if fresh:
            # Lanes of this process that take the new rows straight from here (no claim).
            leases = self.handoff.intake_leases() if self.handoff is not None else {}
            try:
                existing, rows, matches, stored, queued = await self._store(
                    space_id, source, fresh, now, leases, merge=False
                )
            except asyncpg.UniqueViolationError:
                # A concurrent request stored one of these order ids after this one looked:
                # again, skipping what is stored by then.
                existing, rows, matches, stored, queued = await self._store(
                    space_id, source, fresh, now, leases, merge=True
                )
            by_order = {p.order_id: m for p, m in zip(rows, matches, strict=True)}
            if any(q.lease_token is None for q in queued):
                self.on_enqueued()
            if leases and queued:
                try:
                    self._hand_over(leases, queued, rows, by_order, stored, now)
                except Exception:
                    # Committed all the same: the rows are claimed when their lease runs out.
                    log.exception("handing new conversions to delivery failed")
            if len(stored) < len(rows):
                # Stored meanwhile by a concurrent request with the same order ids.
                existing.update(
                    await store.existing_orders(
                        self.pool, space_id, source, [p.order_id for p in rows if p.order_id not in stored]
                    )
                )
            for i, p in fresh:
                res = results[i]
                if p.order_id in stored:
                    m = by_order[p.order_id]
                    res.outcome = pb.OUTCOME_ACCEPTED
                    res.name = f"conversions/{stored[p.order_id]}"
                    res.match_status = _MATCH[m.status]
                    res.match_reason = m.reason
                    match_tally[(m.status, m.reason)] = match_tally.get((m.status, m.reason), 0) + 1
                else:
                    res.outcome = pb.OUTCOME_DUPLICATE
                    res.name = f"conversions/{existing.get(p.order_id, 0)}"
        for i, first in repeated:
            results[i].name = results[first].name
        accepted = sum(match_tally.values())
        response.accepted = accepted
        response.duplicates = count - accepted - rejected
        response.rejected = rejected
        response.matched = sum(n for (status_, _), n in match_tally.items() if status_ == domain.MATCHED)
        metrics.CONVERSIONS.labels("accepted").inc(accepted)
        metrics.CONVERSIONS.labels("duplicate").inc(response.duplicates)
        metrics.CONVERSIONS.labels("rejected").inc(rejected)
        for (status_, reason_), n in match_tally.items():
            metrics.MATCHES.labels(status_, reason_).inc(n)
        self._accepted += response.accepted
        self._matched += response.matched
        if self._accepted:
            metrics.MATCH_RATE.set(self._matched / self._accepted)
        return response

    async def _store(
        self,
        space_id: str,
        source: str,
        fresh: list[tuple[int, domain.Prepared]],
        now: datetime,
        leases: dict[str, tuple[int, float]],
        *,
        merge: bool,
    ) -> tuple[
        dict[str, int], list[domain.Prepared], list[store.MatchResult], dict[str, int], list[store.Queued]
    ]:
        """One transaction: the new conversions matched, stored and queued. Returns the order ids
        already stored, the new rows, their matches, order id -> id of those stored now, and the
        outbox rows."""
        async with self.pool.acquire() as conn, conn.transaction():
            existing = await store.existing_orders(conn, space_id, source, [p.order_id for _, p in fresh])
            rows = [p for _, p in fresh if p.order_id not in existing]
            matches = await self.matcher.match(conn, space_id, rows)
            insert = store.insert_conversions if merge else store.copy_conversions
            stored = await insert(conn, space_id, source, rows, matches, now)
            ids = [stored[p.order_id] for p in rows if p.order_id in stored]
            names = [p.event_name for p in rows if p.order_id in stored]
            queued = await store.enqueue(
                conn,
                ids,
                names,
                {dest: token for dest, (token, _) in leases.items()},
                self.handoff.lease_seconds if self.handoff is not None else 0.0,
            )
        return existing, rows, matches, stored, queued

    def _hand_over(
        self,
        leases: dict[str, tuple[int, float]],
        queued: list[store.Queued],
        rows: list[domain.Prepared],
        by_order: dict[str, store.MatchResult],
        stored: dict[str, int],
        now: datetime,
    ) -> None:
        """Committed rows leased to this process's lanes go to them with what intake knows."""
        assert self.handoff is not None
        by_id = {stored[p.order_id]: p for p in rows if p.order_id in stored}
        per_dest: dict[str, list[Claimed]] = {}
        for q in queued:
            if q.lease_token is None:
                continue
            p = by_id[q.conversion_id]
            per_dest.setdefault(q.destination_id, []).append(
                handed(q.outbox_id, q.conversion_id, p, by_order[p.order_id], now)
            )
        for dest, claimed_rows in per_dest.items():
            token, deadline = leases[dest]
            self.handoff.hand_over(dest, token, deadline, claimed_rows)

    # --- destinations ----------------------------------------------------------------------

    def _to_proto(self, r: asyncpg.Record) -> pb.Destination:
        d = pb.Destination(
            name=f"destinations/{r['id']}",
            display_name=r["display_name"],
            kind=_KIND_NUMBERS.get(r["kind"], pb.DESTINATION_KIND_UNSPECIFIED),
            base_url=r["base_url"],
            settings={k: str(v) for k, v in (r["settings"] or {}).items()},
            credential_env=dict(r["credential_env"] or {}),
            credential_keys=list(r["credential_keys"]),
            event_names=list(r["event_names"]),
            enabled=r["enabled"],
            requests_per_second=r["requests_per_second"],
            max_batch_size=r["max_batch_size"],
        )
        d.create_time.FromDatetime(r["created_at"])
        d.update_time.FromDatetime(r["updated_at"])
        return d

    def _check_config(
        self, kind: str, base_url: str, settings: dict[str, str], field: str = "destination"
    ) -> None:
        bad = []
        for key in destinations.REQUIRED_SETTINGS[kind]:
            if not settings.get(key, "").strip():
                bad.append(Violation(f"{field}.settings.{key}", "REQUIRED", f"{kind} needs settings.{key}"))
        if base_url and not re.match(r"^https?://[^\s/]+", base_url):
            bad.append(Violation(f"{field}.base_url", "INVALID_URL", "base_url must be an http(s) URL"))
        days = settings.get("click_through_days", "")
        if days and (not days.isdigit() or not 1 <= int(days) <= 90):
            bad.append(Violation(f"{field}.settings.click_through_days", "OUT_OF_RANGE", "1 to 90 days"))
        if not bad:
            try:
                destinations.build(kind, base_url, settings, destinations.Secrets(), 1, 1.0)
            except (ValueError, KeyError) as exc:
                bad.append(Violation(f"{field}.settings", "INVALID", str(exc)))
        if bad:
            raise invalid_argument("INVALID_DESTINATION", "the destination is invalid", bad)

    def _seal(self, credentials: dict[str, str]) -> bytes | None:
        if not credentials:
            return None
        try:
            return self.box.seal(credentials)
        except CredentialsError as exc:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "SECRET_KEY_MISSING", str(exc)) from exc

    async def CreateDestination(
        self, request: pb.CreateDestinationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Destination:
        d = request.destination
        kind = _KIND_NAMES.get(d.kind)
        if kind is None:
            raise invalid_argument(
                "INVALID_DESTINATION",
                "kind is required",
                [Violation("destination.kind", "REQUIRED", "choose a destination kind")],
            )
        dest_id = request.destination_id.strip() or f"dst-{secrets.token_hex(6)}"
        if not _ID.match(dest_id):
            raise invalid_argument(
                "INVALID_DESTINATION",
                "bad destination_id",
                [
                    Violation(
                        "destination_id", "INVALID_ID", "lower-case letters, digits and dashes, at most 63"
                    )
                ],
            )
        settings = dict(d.settings)
        self._check_config(kind, d.base_url, settings)
        if d.requests_per_second < 0 or d.max_batch_size < 0:
            raise invalid_argument(
                "INVALID_DESTINATION",
                "negative limits",
                [Violation("destination.requests_per_second", "OUT_OF_RANGE", "must be 0 or more")],
            )
        credentials = dict(d.credentials)
        row, created = await store.create_destination(
            self.pool,
            {
                "id": dest_id,
                "display_name": d.display_name,
                "kind": kind,
                "base_url": d.base_url,
                "settings": settings,
                "credential_env": dict(d.credential_env),
                "credentials_encrypted": self._seal(credentials),
                "credential_keys": sorted({*credentials, *d.credential_env}),
                "event_names": list(d.event_names),
                "enabled": d.enabled,
                "requests_per_second": d.requests_per_second,
                "max_batch_size": d.max_batch_size,
            },
        )
        if not created and not request.request_id:
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS, "DESTINATION_EXISTS", f"destinations/{dest_id} exists"
            )
        self.on_destinations_changed()
        return self._to_proto(row)

    async def GetDestination(
        self, request: pb.GetDestinationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Destination:
        dest_id = _resource_id(request.name, "destinations", "name")
        row = await store.get_destination(self.pool, dest_id)
        if row is None:
            raise not_found("DESTINATION_NOT_FOUND", f"{request.name} does not exist", name=request.name)
        return self._to_proto(row)

    async def ListDestinations(
        self, request: pb.ListDestinationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDestinationsResponse:
        size = request.page_size or 50
        if not 0 < size <= 500:
            raise invalid_argument(
                "INVALID_REQUEST", "bad page_size", [Violation("page_size", "OUT_OF_RANGE", "1 to 500")]
            )
        rows = await store.list_destinations(self.pool, request.page_token, size + 1)
        out = pb.ListDestinationsResponse(destinations=[self._to_proto(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            out.next_page_token = f"{last['created_at'].isoformat()}|{last['id']}"
        return out

    async def UpdateDestination(
        self, request: pb.UpdateDestinationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Destination:
        dest_id = _resource_id(request.destination.name, "destinations", "destination.name")
        paths = list(request.update_mask.paths)
        if not paths:
            raise invalid_argument(
                "INVALID_REQUEST",
                "update_mask is required",
                [Violation("update_mask", "REQUIRED", "name the fields to change")],
            )
        unknown = [p for p in paths if p not in _UPDATABLE]
        if unknown:
            raise invalid_argument(
                "INVALID_REQUEST",
                "fields cannot be updated",
                [Violation("update_mask", "NOT_UPDATABLE", ", ".join(unknown))],
            )
        current = await store.get_destination(self.pool, dest_id)
        if current is None:
            raise not_found(
                "DESTINATION_NOT_FOUND",
                f"{request.destination.name} does not exist",
                name=request.destination.name,
            )
        d = request.destination
        changes: dict[str, Any] = {}
        for path in paths:
            if path == "credentials":
                creds = dict(d.credentials)
                changes["credentials_encrypted"] = self._seal(creds)
            elif path in ("settings", "credential_env"):
                changes[path] = dict(getattr(d, path))
            elif path == "event_names":
                changes[path] = list(d.event_names)
            else:
                changes[path] = getattr(d, path)
        settings = changes.get("settings", current["settings"] or {})
        self._check_config(current["kind"], changes.get("base_url", current["base_url"]), settings)
        if "credentials_encrypted" in changes or "credential_env" in changes:
            old_env = set(current["credential_env"] or {})
            if "credentials_encrypted" in changes:
                stored_keys = set(d.credentials)
            else:
                stored_keys = set(current["credential_keys"]) - old_env
            env_keys = set(changes.get("credential_env", current["credential_env"] or {}))
            changes["credential_keys"] = sorted(stored_keys | env_keys)
        row = await store.update_destination(self.pool, dest_id, changes)
        assert row is not None
        self.on_destinations_changed()
        return self._to_proto(row)

    # --- status and dead letters -----------------------------------------------------------

    async def GetDeliveryStatus(
        self, request: pb.GetDeliveryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeliveryStatusResponse:
        if len(request.names) > _MAX_STATUS or len(request.order_ids) > _MAX_STATUS:
            raise invalid_argument(
                "INVALID_REQUEST", "too many", [Violation("names", "TOO_MANY", f"at most {_MAX_STATUS}")]
            )
        if request.order_ids and not request.source:
            raise invalid_argument(
                "INVALID_REQUEST",
                "source is required with order_ids",
                [Violation("source", "REQUIRED", "order ids are unique per source")],
            )
        ids = [_int_id(n, "conversions", "names") for n in request.names]
        rows = list(await store.conversions_by_ids(self.pool, ids)) if ids else []
        if request.order_ids:
            rows += await store.conversions_by_orders(
                self.pool, request.space_id or "default", request.source, list(request.order_ids)
            )
        order = {cid: k for k, cid in enumerate(ids)}
        order_pos = {o: k for k, o in enumerate(request.order_ids)}
        rows.sort(key=lambda r: (order.get(r["id"], len(order)), order_pos.get(r["order_id"], 0)))
        deliveries = await store.deliveries_of(self.pool, [r["id"] for r in rows])
        attempts = await store.attempts_of(self.pool, [d["id"] for d in deliveries])
        by_conv: dict[int, list[asyncpg.Record]] = {}
        for d in deliveries:
            by_conv.setdefault(d["conversion_id"], []).append(d)
        by_delivery: dict[int, list[asyncpg.Record]] = {}
        for a in attempts:
            by_delivery.setdefault(a["outbox_id"], []).append(a)
        out = pb.GetDeliveryStatusResponse()
        for r in rows:
            given = bool(r["gclid"] or r["gbraid"] or r["wbraid"])
            status = out.conversions.add(
                name=f"conversions/{r['id']}",
                order_id=r["order_id"],
                source=r["source"],
                match_status=_MATCH.get(r["match_status"], pb.MATCH_STATUS_UNSPECIFIED),
                match_reason=r["match_reason"],
                profile_id=r["profile_id"] or "",
                gclid=r["gclid"] if given else (r["click_value"] if r["click_kind"] == "gclid" else ""),
                gbraid=r["gbraid"] if given else (r["click_value"] if r["click_kind"] == "gbraid" else ""),
                wbraid=r["wbraid"] if given else (r["click_value"] if r["click_kind"] == "wbraid" else ""),
                fbc=r["fbc"] or "",
                campaign={k: str(v) for k, v in (r["campaign"] or {}).items()},
                create_time=_ts(r["received_at"]),
            )
            for d in by_conv.get(r["id"], []):
                delivery = status.deliveries.add(
                    destination=f"destinations/{d['destination_id']}",
                    state=_STATES.get(d["state"], pb.DELIVERY_STATE_UNSPECIFIED),
                    attempt_count=d["attempts"],
                    reason=d["reason"],
                    deliver_time=_ts(d["delivered_at"]),
                    next_attempt_time=_ts(d["next_attempt_at"]) if d["state"] == "pending" else None,
                )
                for a in by_delivery.get(d["id"], []):
                    delivery.attempts.add(
                        attempt_time=_ts(a["at"]),
                        http_status=a["http_status"],
                        outcome=a["outcome"],
                        reason=a["reason"],
                        detail=a["detail"] or a["response"][:500],
                    )
        return out

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeadLettersResponse:
        size = request.page_size or 100
        if not 0 < size <= 1000:
            raise invalid_argument(
                "INVALID_REQUEST", "bad page_size", [Violation("page_size", "OUT_OF_RANGE", "1 to 1000")]
            )
        dest = (
            _resource_id(request.destination, "destinations", "destination") if request.destination else None
        )
        after = int(request.page_token) if request.page_token.isdigit() else 0
        rows = await store.dead_letters(self.pool, dest, after, size + 1)
        out = pb.ListDeadLettersResponse()
        for r in rows[:size]:
            out.dead_letters.add(
                name=f"deliveries/{r['id']}",
                conversion=f"conversions/{r['conversion_id']}",
                order_id=r["order_id"],
                destination=f"destinations/{r['destination_id']}",
                reason=r["reason"],
                detail=r["detail"],
                attempt_count=r["attempts"],
                dead_time=_ts(r["dead_at"]),
            )
        if len(rows) > size:
            out.next_page_token = str(rows[size - 1]["id"])
        return out

    async def ReplayDeadLetters(
        self, request: pb.ReplayDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReplayDeadLettersResponse:
        if len(request.names) > _MAX_REPLAY:
            raise invalid_argument(
                "INVALID_REQUEST", "too many", [Violation("names", "TOO_MANY", f"at most {_MAX_REPLAY}")]
            )
        ids = [_int_id(n, "deliveries", "names") for n in request.names] or None
        dest = (
            _resource_id(request.destination, "destinations", "destination") if request.destination else None
        )
        n = await store.replay_dead(self.pool, ids, dest)
        if n:
            self.on_enqueued()
        return pb.ReplayDeadLettersResponse(replayed=n)
