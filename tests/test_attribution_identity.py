"""Attribution with the real identity service: paths follow the profiles it publishes in
identity.profile_identifiers, including links attribution's own fallback cannot see (an email)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from services.attribution.app import AttributionApp, AttributionSettings, start_attribution
from services.identity.app import IdentitySettings, start_identity
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source
from tests.test_attribution_service import D0, H, identify, page, query, track, utm, write
from touchpoint.attribution.v1 import attribution_service_pb2 as pb
from touchpoint.attribution.v1 import attribution_service_pb2_grpc as pb_grpc
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from touchpoint.platform.testing import eventually


@pytest.fixture(scope="module")
async def apps(pool: asyncpg.Pool) -> AsyncIterator[tuple[IngestApp, AttributionApp]]:
    ingest = await start_ingest(pool, IngestSettings.for_tests())
    identity = await start_identity(pool, IdentitySettings.for_tests(ingest_addr=ingest.address))
    attribution = await start_attribution(pool, AttributionSettings.for_tests())
    yield ingest, attribution
    await attribution.stop()
    await identity.stop()
    await ingest.stop()


async def test_a_profile_stitched_by_email_carries_the_laptop_click_to_the_phone_purchase(
    pool: asyncpg.Pool, apps: tuple[IngestApp, AttributionApp]
) -> None:
    ingest, attribution = apps
    key = "wk_" + secrets.token_hex(4)
    await create_source(pool, write_key=key, name="web")
    async with (
        grpc.aio.insecure_channel(ingest.address) as ich,
        grpc.aio.insecure_channel(attribution.address) as ach,
    ):
        istub = ipb_grpc.IngestServiceStub(ich)
        stub = pb_grpc.AttributionServiceStub(ach)
        await write(
            istub,
            key,
            [
                # Laptop: an ad click, then a newsletter sign-up form (email, no login).
                page(D0 + H, utm("facebook", "paid-social"), anonymous_id="laptop"),
                identify(D0 + 2 * H, anonymous_id="laptop", traits={"email": "Toast@Example.com"}),
                # Phone: logs in as a user with that email, then buys without a user id on the event.
                identify(
                    D0 + 30 * H, anonymous_id="phone", user_id="u-9", traits={"email": "toast@example.com"}
                ),
                track(
                    D0 + 31 * H, "Order Completed", {"order_id": "x-1", "revenue": 12}, anonymous_id="phone"
                ),
            ],
        )

        async def report() -> pb.GetCampaignReportResponse | None:
            r = await stub.GetCampaignReport(
                pb.GetCampaignReportRequest(
                    query=query(group_by=[pb.DIMENSION_SOURCE]), model=pb.MODEL_LAST_NON_DIRECT
                )
            )
            credited = {x.dimensions.source: x.conversions for x in r.rows if x.conversions}
            return r if credited == {"facebook": 1.0} else None

        # Only the identity graph (the shared email) ties the two devices together.
        r = await eventually(report, timeout=20, message="the laptop click was never credited")
        assert r.totals.revenue == 12
        path = await stub.GetConversionPath(pb.GetConversionPathRequest(name="conversions/x-1"))
        assert path.conversion.profile.startswith("profile:")
        assert [t.identifier for t in path.touches] == ["anonymous_id:laptop"]
