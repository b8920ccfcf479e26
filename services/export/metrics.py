"""The export service's Prometheus metrics (labels are bounded: outcomes, destination ids set by
operators, and reason codes)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONVERSIONS = Counter("touchpoint_export_conversions_total", "Uploaded conversions by outcome.", ["outcome"])
REJECTIONS = Counter(
    "touchpoint_export_rejections_total", "Rejected conversions by field and reason.", ["field", "reason"]
)
MATCHES = Counter(
    "touchpoint_export_matches_total",
    "Accepted conversions by match status and reason.",
    ["status", "reason"],
)
MATCH_RATE = Gauge(
    "touchpoint_export_match_ratio",
    "Share of conversions accepted by this process that matched a profile.",
    multiprocess_mode="liveall",
)
DELIVERED = Counter(
    "touchpoint_export_delivered_total", "Deliveries accepted by a platform.", ["destination"]
)
FAILED = Counter(
    "touchpoint_export_failed_total", "Deliveries dead-lettered, by reason.", ["destination", "reason"]
)
SKIPPED = Counter(
    "touchpoint_export_skipped_total",
    "Deliveries not for a destination, by reason.",
    ["destination", "reason"],
)
RETRIES = Counter(
    "touchpoint_export_retries_total", "Deliveries scheduled again, by reason.", ["destination", "reason"]
)
REQUESTS = Counter(
    "touchpoint_export_requests_total",
    "Requests to platforms, by HTTP status (0: none).",
    ["destination", "status"],
)
# Read from the database: every worker process reports the same figure; the largest is kept.
OUTBOX_DEPTH = Gauge(
    "touchpoint_export_outbox_depth",
    "Deliveries pending or being sent.",
    ["destination"],
    multiprocess_mode="livemax",
)
OUTBOX_OLDEST = Gauge(
    "touchpoint_export_outbox_oldest_age_seconds",
    "Age of the oldest undelivered delivery.",
    ["destination"],
    multiprocess_mode="livemax",
)
LATENCY = Histogram(
    "touchpoint_export_delivery_latency_seconds",
    "Time from intake to a platform's acceptance.",
    ["destination"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
)
