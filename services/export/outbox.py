"""Delivery: workers that drain the Postgres outbox into the destinations.

One lane per enabled destination. A lane leases a batch (``store.claim``: FOR UPDATE SKIP
LOCKED in a short transaction, so replicas never take the same rows), validates every row
(``prepare``), sends the good ones in one request under the destination's rate limit, and
records every row's result in one transaction: delivered, retried later (exponential backoff
with jitter, never sooner than Retry-After, which also pauses the whole lane), dead-lettered
with the reason, or skipped. A worker that dies mid-batch leaves its rows leased; when the lease
runs out they are sent again, and the platforms' dedup (event_id / order id) makes that one
effect. A committed delivery is never sent again.

Hand-off: when intake and delivery run in the same process, new conversions skip the claim. The
intake transaction inserts their outbox rows already leased to a lane of this process (same
lease, same token rules as a claim) and, once committed, hands the rows it has in memory to that
lane, which sends them next. Nothing is held only in memory: if the process dies, the leases run
out and any replica claims the rows like any other. A lane takes hand-offs only while it keeps
up (not paused by Retry-After, a bounded backlog); otherwise the rows are queued as pending.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import asyncpg

from services.export import destinations, domain, metrics, store
from services.export.credentials import CredentialsError, SecretBox
from services.export.destinations.base import Destination, Outcome, Outgoing, Rejected, RowResult
from services.export.domain import Prepared
from services.export.store import MatchResult, RowUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliverySettings:
    # Seconds between looks at the outbox when no NOTIFY arrives.
    poll_interval_seconds: float = 0.5
    # Seconds a claimed batch stays with its worker before others may take it again.
    lease_seconds: float = 60.0
    # Seconds one HTTP request may take.
    request_timeout_seconds: float = 30.0
    # First retry delay; doubles per attempt, with jitter.
    retry_base_seconds: float = 1.0
    # Longest retry delay.
    retry_cap_seconds: float = 600.0
    # Attempts before a retryable failure is parked in the dead letters.
    max_attempts: int = 12
    # Requests per second per destination and replica, unless the destination sets its own.
    default_requests_per_second: float = 20.0
    # Batches of one destination in flight at once, per replica.
    concurrency_per_destination: int = 2
    # Seconds between reloads of the destinations' configuration.
    refresh_seconds: float = 5.0
    # Seconds between outbox depth measurements.
    maintenance_seconds: float = 1.0
    # Rows handed over by intake and waiting in a lane's memory, beyond which new conversions
    # are queued as pending instead (0: no hand-off).
    handoff_max_rows: int = 10_000


class TokenBucket:
    """Requests per second with a burst of one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = max(rate, 0.001)
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    def set_rate(self, rate: float) -> None:
        self.rate = max(rate, 0.001)
        self.capacity = max(1.0, self.rate)

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


@dataclass(slots=True)
class Claimed:
    """A delivery leased to this worker: the conversion as it goes out and the outbox fields the
    result needs."""

    outgoing: Outgoing
    attempts: int
    retry_base: int
    received_at: datetime


def to_outgoing(r: asyncpg.Record) -> Outgoing:
    """A claimed row as it goes out. Click ids the store captured win over matched ones."""
    given = bool(r["gclid"] or r["gbraid"] or r["wbraid"])
    kind, value = r["click_kind"], r["click_value"] or ""
    return Outgoing(
        outbox_id=r["outbox_id"],
        conversion_id=r["conversion_id"],
        order_id=r["order_id"],
        event_name=r["event_name"],
        event_time=r["event_time"],
        time_zone=r["time_zone"],
        value=r["value"],
        currency=r["currency"],
        meta_user_data=r["meta_user_data"] or {},
        google_user=r["google_user"] or {},
        gclid=r["gclid"] if given else (value if kind == "gclid" else ""),
        gbraid=r["gbraid"] if given else (value if kind == "gbraid" else ""),
        wbraid=r["wbraid"] if given else (value if kind == "wbraid" else ""),
        click_time=None if given else r["click_time"],
        fbc=r["fbc"] or "",
        store_id=r["store_id"],
    )


def claimed(r: asyncpg.Record) -> Claimed:
    return Claimed(to_outgoing(r), r["attempts"], r["retry_base"], r["received_at"])


def handed(outbox_id: int, conversion_id: int, p: Prepared, m: MatchResult, received_at: datetime) -> Claimed:
    """A conversion intake has just stored, as `claimed` would read it back (first attempt)."""
    given = bool(p.gclid or p.gbraid or p.wbraid)
    click = None if given else m.google
    kind, value = (click.kind, click.value) if click is not None else ("", "")
    return Claimed(
        Outgoing(
            outbox_id=outbox_id,
            conversion_id=conversion_id,
            order_id=p.order_id,
            event_name=p.event_name,
            event_time=p.event_time,
            time_zone=p.time_zone,
            value=p.value,
            currency=p.currency,
            meta_user_data=p.meta_user_data,
            google_user=p.google_user,
            gclid=p.gclid if given else (value if kind == "gclid" else ""),
            gbraid=p.gbraid if given else (value if kind == "gbraid" else ""),
            wbraid=p.wbraid if given else (value if kind == "wbraid" else ""),
            click_time=click.first_seen if click is not None else None,
            fbc=m.meta_fbc or "",
            store_id=p.store_id,
        ),
        1,
        0,
        received_at,
    )


class Handoff(Protocol):
    """Where intake hands the conversions it has just stored (the `Deliverer` of its process)."""

    lease_seconds: float

    def intake_leases(self) -> dict[str, tuple[int, float]]: ...

    def hand_over(self, dest_id: str, token: int, deadline: float, rows: list[Claimed]) -> bool: ...


@dataclass(slots=True)
class Handed:
    """Rows intake leased to a lane: sent only while at least half their lease is left."""

    token: int
    rows: list[Claimed]
    deadline: float


class Lane:
    """One destination's delivery loop in this process."""

    def __init__(self, dest_id: str, destination: Destination, rate: float, updated_at: datetime) -> None:
        self.dest_id = dest_id
        self.destination = destination
        self.bucket = TokenBucket(rate)
        self.updated_at = updated_at
        self.paused_until = 0.0
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.inflight: set[asyncio.Task[None]] = set()
        self.handed: collections.deque[Handed] = collections.deque()
        self.handed_rows = 0


class Deliverer:
    """The lanes of this process (see the module's docstring); also the intake's `Handoff`."""

    def __init__(self, pool: asyncpg.Pool, settings: DeliverySettings, box: SecretBox) -> None:
        self.pool = pool
        self.settings = settings
        self.box = box
        self.lanes: dict[str, Lane] = {}
        self._stopping = asyncio.Event()
        self._reload = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._listener: asyncpg.Connection | None = None
        self._rng = random.Random()
        self.lease_seconds = settings.lease_seconds

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        await self.reload_now()
        try:
            self._listener = await self.pool.acquire()
            await self._listener.add_listener(store.NOTIFY_CHANNEL, self._on_notify)
        except Exception:
            log.exception("cannot LISTEN for outbox notifications; polling only")
        self._tasks = [
            asyncio.create_task(self._refresh_loop(), name="export-refresh"),
            asyncio.create_task(self._maintenance_loop(), name="export-maintenance"),
        ]

    async def stop(self) -> None:
        """Stops claiming, lets in-flight batches finish and record their results."""
        self._stopping.set()
        for lane in self.lanes.values():
            lane.wake.set()
        for task in self._tasks:
            task.cancel()
        lane_tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
        await asyncio.gather(*self._tasks, *lane_tasks, return_exceptions=True)
        inflight = [t for lane in self.lanes.values() for t in lane.inflight]
        await asyncio.gather(*inflight, return_exceptions=True)
        for lane in self.lanes.values():
            await self._release_handed(lane)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.remove_listener(store.NOTIFY_CHANNEL, self._on_notify)
                await self.pool.release(self._listener)
        if self._session is not None:
            await self._session.close()

    def wake(self) -> None:
        """New rows were queued: every lane looks now rather than at its next poll."""
        for lane in self.lanes.values():
            lane.wake.set()

    def reload(self) -> None:
        """A destination changed: reload the configuration soon."""
        self._reload.set()

    def _on_notify(self, *_: Any) -> None:
        self.wake()

    # --- hand-off from intake --------------------------------------------------------------

    def intake_leases(self) -> dict[str, tuple[int, float]]:
        """Destination -> (lease token, deadline) for each lane that takes new conversions from
        intake now; intake inserts their outbox rows leased with that token. The deadline
        (monotonic) is half a lease from now: the lease itself starts later, with the intake
        transaction."""
        if self._stopping.is_set() or self.settings.handoff_max_rows <= 0:
            return {}
        now = time.monotonic()
        deadline = now + self.settings.lease_seconds / 2
        return {
            dest_id: (self._rng.getrandbits(62), deadline)
            for dest_id, lane in self.lanes.items()
            if lane.paused_until <= now and lane.handed_rows < self.settings.handoff_max_rows
        }

    def hand_over(self, dest_id: str, token: int, deadline: float, rows: list[Claimed]) -> bool:
        """Committed rows leased to `dest_id`'s lane with `token`: sent next, in batches. False
        when the lane is gone (the rows are then claimed when their lease runs out)."""
        lane = self.lanes.get(dest_id)
        if lane is None or self._stopping.is_set():
            return False
        size = max(1, lane.destination.max_batch)
        for start in range(0, len(rows), size):
            lane.handed.append(Handed(token, rows[start : start + size], deadline))
        lane.handed_rows += len(rows)
        lane.wake.set()
        return True

    async def _release_handed(self, lane: Lane, batch: Handed | None = None) -> None:
        """Handed rows this lane will not send (stopping, or half their lease gone): back to
        pending now, so that any worker claims them without waiting for the lease to run out."""
        batches = [batch] if batch is not None else list(lane.handed)
        if batch is None:
            lane.handed.clear()
            lane.handed_rows = 0
        for b in batches:
            try:
                await store.release(self.pool, b.token, [c.outgoing.outbox_id for c in b.rows])
            except Exception:
                log.exception("releasing handed rows failed; they wait for their lease to run out")

    # --- configuration ---------------------------------------------------------------------

    async def reload_now(self) -> None:
        rows = await store.list_destinations(self.pool)
        seen = set()
        for r in rows:
            if not r["enabled"]:
                continue
            seen.add(r["id"])
            lane = self.lanes.get(r["id"])
            if lane is not None and lane.updated_at == r["updated_at"]:
                continue
            try:
                dest = self._build(r)
            except (CredentialsError, ValueError, KeyError) as exc:
                log.error("destination cannot be built", extra={"destination": r["id"], "error": str(exc)})
                seen.discard(r["id"])
                continue
            rate = r["requests_per_second"] or self.settings.default_requests_per_second
            if lane is None:
                lane = Lane(r["id"], dest, rate, r["updated_at"])
                self.lanes[r["id"]] = lane
                lane.task = asyncio.create_task(self._lane_loop(lane), name=f"export-lane-{r['id']}")
            else:
                lane.destination = dest
                lane.bucket.set_rate(rate)
                lane.updated_at = r["updated_at"]
            lane.wake.set()
        for dest_id in list(self.lanes):
            if dest_id not in seen:
                lane = self.lanes.pop(dest_id)
                if lane.task is not None:
                    lane.task.cancel()
                await self._release_handed(lane)

    def _build(self, r: asyncpg.Record) -> Destination:
        secrets = self.box.secrets(r["credentials_encrypted"], r["credential_env"] or {})
        return destinations.build(
            r["kind"],
            r["base_url"],
            r["settings"] or {},
            secrets,
            r["max_batch_size"] or 100_000,
            self.settings.request_timeout_seconds,
        )

    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload.wait(), self.settings.refresh_seconds)
            self._reload.clear()
            try:
                await self.reload_now()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reloading destinations failed")

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                depth = {r["destination_id"]: r for r in await store.outbox_depth(self.pool)}
                for dest_id in {*depth, *self.lanes}:
                    row = depth.get(dest_id)
                    metrics.OUTBOX_DEPTH.labels(dest_id).set(row["depth"] if row else 0)
                    metrics.OUTBOX_OLDEST.labels(dest_id).set(row["oldest_age"] if row else 0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox maintenance failed")
            await asyncio.sleep(self.settings.maintenance_seconds)

    # --- delivery --------------------------------------------------------------------------

    async def _lane_loop(self, lane: Lane) -> None:
        slots = asyncio.Semaphore(self.settings.concurrency_per_destination)
        while not self._stopping.is_set():
            try:
                wait = lane.paused_until - time.monotonic()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), wait)
                    continue
                await slots.acquire()
                if self._stopping.is_set():
                    slots.release()
                    break
                lane.wake.clear()
                if lane.handed:
                    batch = lane.handed.popleft()
                    lane.handed_rows -= len(batch.rows)
                    if time.monotonic() > batch.deadline:
                        slots.release()
                        await self._release_handed(lane, batch)
                        continue
                    token, rows = batch.token, batch.rows
                else:
                    token = self._rng.getrandbits(62)
                    records = await store.claim(
                        self.pool,
                        lane.dest_id,
                        lane.destination.max_batch,
                        self.settings.lease_seconds,
                        token,
                    )
                    if not records:
                        slots.release()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(lane.wake.wait(), self.settings.poll_interval_seconds)
                        continue
                    reclaimed = sum(1 for r in records if r["reason"] == "LEASE_EXPIRED")
                    if reclaimed:
                        log.warning(
                            "deliveries of a stopped worker taken again",
                            extra={"destination": lane.dest_id, "count": reclaimed},
                        )
                    rows = [claimed(r) for r in records]
                task = asyncio.create_task(self._deliver(lane, rows, token))
                lane.inflight.add(task)

                def done(t: asyncio.Task[None], lane: Lane = lane) -> None:
                    lane.inflight.discard(t)
                    slots.release()

                task.add_done_callback(done)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("claiming failed; retrying", extra={"destination": lane.dest_id})
                with contextlib.suppress(ValueError):
                    slots.release()
                await asyncio.sleep(1.0)

    async def _deliver(self, lane: Lane, rows: list[Claimed], token: int) -> None:
        dest = lane.destination
        now = datetime.now(UTC)
        results: list[RowResult | None] = [None] * len(rows)
        payloads: list[dict[str, Any]] = []
        sent_index: list[int] = []
        for i, r in enumerate(rows):
            try:
                payloads.append(dest.prepare(r.outgoing, now))
                sent_index.append(i)
            except Rejected as rejected:
                results[i] = rejected.result
            except Exception as exc:
                log.exception("preparing a conversion failed", extra={"destination": lane.dest_id})
                results[i] = RowResult(Outcome.FAILED, "PREPARE_ERROR", type(exc).__name__)
        http_status = http_requests = 0
        response = ""
        retry_after = None
        started = time.perf_counter()
        if payloads:
            await lane.bucket.acquire()
            assert self._session is not None
            try:
                batch = await dest.send(self._session, payloads)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("sending failed", extra={"destination": lane.dest_id})
                batch = destinations.base.BatchResult(
                    [RowResult(Outcome.RETRY, "SEND_ERROR", type(exc).__name__)] * len(payloads), 0, ""
                )
            for j, i in enumerate(sent_index):
                results[i] = batch.rows[j]
            http_status, http_requests, response = batch.http_status, batch.requests, batch.response
            retry_after = batch.retry_after
            metrics.REQUESTS.labels(lane.dest_id, str(http_status)).inc(batch.requests)
            if retry_after:
                lane.paused_until = max(lane.paused_until, time.monotonic() + retry_after)
        duration_ms = (time.perf_counter() - started) * 1000
        # One jittered delay per retry count in a batch: rows that failed together retry together
        # (one batch again), and the jitter still spreads batches and replicas.
        delays: dict[int, float] = {}
        updates = [
            self._update(lane.dest_id, r, res, retry_after, delays)
            for r, res in zip(rows, results, strict=True)
        ]
        try:
            await store.complete(
                self.pool,
                lane.dest_id,
                token,
                updates,
                http_status=http_status,
                http_requests=http_requests,
                duration_ms=duration_ms,
                response=response,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            # The rows stay leased and are sent again when the lease runs out (dedup makes that safe).
            log.exception("recording delivery results failed", extra={"destination": lane.dest_id})
            return
        done = datetime.now(UTC)
        latency = metrics.LATENCY.labels(lane.dest_id)
        delivered = 0
        for r, u in zip(rows, updates, strict=True):
            if u.state == "delivered":
                delivered += 1
                latency.observe((done - r.received_at).total_seconds())
        metrics.DELIVERED.labels(lane.dest_id).inc(delivered)

    def _update(
        self,
        dest_id: str,
        r: Claimed,
        res: RowResult | None,
        retry_after: float | None,
        delays: dict[int, float],
    ) -> RowUpdate:
        assert res is not None
        attempt = r.attempts
        outbox_id = r.outgoing.outbox_id
        if res.outcome is Outcome.DELIVERED:
            return RowUpdate(outbox_id, attempt, "delivered", "delivered", res.reason, res.detail)
        if res.outcome is Outcome.SKIPPED:
            metrics.SKIPPED.labels(dest_id, res.reason).inc()
            return RowUpdate(outbox_id, attempt, "skipped", "skipped", res.reason, res.detail)
        if res.outcome is Outcome.FAILED:
            metrics.FAILED.labels(dest_id, res.reason).inc()
            return RowUpdate(outbox_id, attempt, "dead", "failed", res.reason, res.detail)
        tries = attempt - r.retry_base
        if tries >= self.settings.max_attempts:
            metrics.FAILED.labels(dest_id, "RETRIES_EXHAUSTED").inc()
            detail = f"{tries} attempts; last: {res.reason} {res.detail}".strip()
            return RowUpdate(outbox_id, attempt, "dead", "retry", "RETRIES_EXHAUSTED", detail[:1000])
        metrics.RETRIES.labels(dest_id, res.reason).inc()
        delay = delays.get(tries)
        if delay is None:
            delay = delays[tries] = domain.retry_delay(
                tries,
                base=self.settings.retry_base_seconds,
                cap=self.settings.retry_cap_seconds,
                retry_after=retry_after,
                rng=self._rng,
            )
        return RowUpdate(outbox_id, attempt, "pending", "retry", res.reason, res.detail, delay)
