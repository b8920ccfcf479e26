"""Where offline conversions go: one interface (prepare one row, send a batch), one class per
platform, and `build` from a stored destination configuration."""

from __future__ import annotations

from typing import Any

from services.export.destinations.base import Destination, Secrets
from services.export.destinations.data_manager import GoogleDataManager
from services.export.destinations.files import GoogleAdsCsv, MetaCsv
from services.export.destinations.google_ads import GoogleAdsClickConversions
from services.export.destinations.meta import MetaCapi

KINDS = ("meta_capi", "google_ads", "google_data_manager", "google_ads_csv", "meta_csv")

# Settings each kind needs (the rest are optional).
REQUIRED_SETTINGS: dict[str, tuple[str, ...]] = {
    "meta_capi": ("dataset_id",),
    "google_ads": ("customer_id", "conversion_action_id"),
    "google_data_manager": ("account_id", "product_destination_id"),
    "google_ads_csv": ("directory", "conversion_name"),
    "meta_csv": ("directory",),
}
DEFAULT_BASE_URLS = {
    "meta_capi": "https://graph.facebook.com",
    "google_ads": "https://googleads.googleapis.com",
    "google_data_manager": "https://datamanager.googleapis.com",
    "google_ads_csv": "",
    "meta_csv": "",
}


def build(
    kind: str, base_url: str, settings: dict[str, Any], secrets: Secrets, max_batch: int, timeout: float
) -> Destination:
    """The destination object of a stored configuration (settings already validated)."""
    s = settings
    base = base_url or DEFAULT_BASE_URLS[kind]
    if kind == "meta_capi":
        return MetaCapi(
            base_url=base,
            dataset_id=s["dataset_id"],
            api_version=s.get("api_version") or "v24.0",
            secrets=secrets,
            test_event_code=s.get("test_event_code", ""),
            max_batch=max_batch,
            timeout=timeout,
        )
    if kind == "google_ads":
        return GoogleAdsClickConversions(
            base_url=base,
            customer_id=s["customer_id"],
            conversion_action_id=s["conversion_action_id"],
            secrets=secrets,
            api_version=s.get("api_version") or "v21",
            login_customer_id=s.get("login_customer_id", ""),
            click_through_days=int(s.get("click_through_days") or 90),
            max_batch=max_batch,
            timeout=timeout,
        )
    if kind == "google_data_manager":
        return GoogleDataManager(
            base_url=base,
            account_id=s["account_id"],
            product_destination_id=s["product_destination_id"],
            secrets=secrets,
            account_type=s.get("account_type") or "GOOGLE_ADS",
            login_account_id=s.get("login_account_id", ""),
            click_through_days=int(s.get("click_through_days") or 90),
            max_batch=max_batch,
            timeout=timeout,
        )
    if kind == "google_ads_csv":
        return GoogleAdsCsv(
            directory=s["directory"],
            conversion_name=s["conversion_name"],
            time_zone=s.get("time_zone") or "UTC",
            max_batch=max_batch,
        )
    if kind == "meta_csv":
        return MetaCsv(directory=s["directory"], max_batch=max_batch)
    raise ValueError(f"unknown destination kind {kind!r}")


__all__ = ["KINDS", "REQUIRED_SETTINGS", "Destination", "Secrets", "build"]
