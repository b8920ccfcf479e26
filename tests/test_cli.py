"""The operators' command line, run in-process (its main(argv)) against real servers on port 0:
ingest, identity, attribution and export over gRPC with their /metrics endpoints, the gateway
over HTTP, one real Postgres, and local stand-ins of the ad platforms for export deliveries."""

from __future__ import annotations

import asyncio
import io
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2_grpc

from services.attribution.app import AttributionApp, AttributionSettings, start_attribution
from services.export.app import ExportApp, ExportSettings, start_export
from services.gateway.app import GatewayServer, build_app, open_ingest_channel, serve
from services.gateway.settings import GatewaySettings
from services.identity.app import IdentityApp, IdentitySettings, start_identity
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source
from tests.export_receivers import Receivers
from touchpoint.export.v1 import export_service_pb2 as epb
from touchpoint.export.v1 import export_service_pb2_grpc as epb_grpc
from touchpoint.ingest.v1 import ingest_service_pb2_grpc
from touchpoint.platform import cli
from touchpoint.platform.testing import eventually, free_port

pytestmark = pytest.mark.timeout(60)


@dataclass
class Stack:
    pool: asyncpg.Pool
    ingest: IngestApp
    identity: IdentityApp
    attribution: AttributionApp
    export: ExportApp
    gateway: GatewayServer
    receivers: Receivers
    export_stub: epb_grpc.ExportServiceStub
    write_key: str

    def flags(self) -> list[str]:
        """Where every service of the stack is, as the CLI's global flags."""
        out = ["--gateway", self.gateway.url]
        for name, app in (
            ("ingest", self.ingest),
            ("identity", self.identity),
            ("attribution", self.attribution),
            ("export", self.export),
        ):
            out += [
                f"--{name}",
                app.address,
                f"--{name}-metrics",
                f"http://127.0.0.1:{app.handle.metrics_port}/metrics",
            ]
        return out


@pytest.fixture(scope="module")
async def stack(pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    ingest = await start_ingest(pool, IngestSettings.for_tests(metrics_port=0))
    identity = await start_identity(pool, IdentitySettings.for_tests(ingest.address, metrics_port=0))
    attribution = await start_attribution(pool, AttributionSettings.for_tests(metrics_port=0))
    export = await start_export(pool, ExportSettings.for_tests(metrics_port=0))
    receivers = Receivers()
    await receivers.start()
    channel = open_ingest_channel(ingest.address)
    settings = GatewaySettings.for_tests(ingest.address)
    app = build_app(
        ingest_service_pb2_grpc.IngestServiceStub(channel),
        settings,
        health=health_pb2_grpc.HealthStub(channel),
    )
    gateway = await serve(app, settings)
    key = "wk_cli_" + secrets.token_hex(6)
    await create_source(pool, write_key=key, name="cli-test")
    try:
        async with grpc.aio.insecure_channel(export.address) as export_channel:
            yield Stack(
                pool,
                ingest,
                identity,
                attribution,
                export,
                gateway,
                receivers,
                epb_grpc.ExportServiceStub(export_channel),
                key,
            )
    finally:
        await gateway.stop()
        await channel.close()
        await export.stop()
        await attribution.stop()
        await identity.stop()
        await ingest.stop()
        await receivers.stop()


async def run(stack: Stack, *argv: str) -> tuple[int, str, str]:
    """Runs `touchpoint <global flags> argv...` in a thread (it runs its own event loop, as on
    the command line); answers (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(cli.main, [*stack.flags(), *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def sent_ids(output: str) -> list[str]:
    return re.findall(r"cli-[0-9a-f-]{36}", output.split("messageId:", 1)[1])


async def stored(pool: asyncpg.Pool, message_ids: list[str]) -> list[asyncpg.Record]:
    return await pool.fetch(
        "select message_id, type, event, user_id, properties from ingest.events where message_id = any($1::text[])",
        message_ids,
    )


def destination(stack: Stack, *, base_url: str, token: str, event: str) -> epb.CreateDestinationRequest:
    return epb.CreateDestinationRequest(
        destination=epb.Destination(
            display_name=f"meta {event}",
            kind=epb.DESTINATION_KIND_META_CAPI,
            base_url=base_url,
            settings={"dataset_id": "987654"},
            credentials={"access_token": token},
            event_names=[event],
            enabled=True,
        )
    )


def conversion(order: str, event: str) -> epb.OfflineConversion:
    c = epb.OfflineConversion(
        order_id=order, event_name=event, value=42.5, currency="USD", email=f"{order}@example.com"
    )
    c.event_time.FromDatetime(datetime.now(UTC) - timedelta(minutes=30))
    return c


# -- settings ---------------------------------------------------------------------------------


def test_endpoints_come_from_the_environment_and_flags_win() -> None:
    env = {
        "TOUCHPOINT_IDENTITY_ADDR": "identity:50052",
        "TOUCHPOINT_EXPORT_METRICS_URL": "http://metrics.example/export",
        "TOUCHPOINT_ATTRIBUTION_METRICS_PORT": "19103",
        "TOUCHPOINT_GATEWAY_URL": "http://gw.example:8080/",
    }
    ep = cli.Endpoints.from_env(env, grpc={"ingest": "10.0.0.5:6000", "identity": None})
    assert ep.grpc == {
        "ingest": "10.0.0.5:6000",
        "identity": "identity:50052",
        "attribution": "127.0.0.1:50053",
        "export": "127.0.0.1:50054",
    }
    assert ep.metrics == {
        "ingest": "http://10.0.0.5:9101/metrics",  # the metrics port on the service's own host
        "identity": "http://identity:9102/metrics",
        "attribution": "http://127.0.0.1:19103/metrics",
        "export": "http://metrics.example/export",
    }
    assert ep.gateway_url == "http://gw.example:8080"
    # Every model and dimension the command line offers is one AttributionService knows.
    from touchpoint.attribution.v1 import attribution_service_pb2 as apb

    assert all(apb.Model.Value("MODEL_" + m.upper().replace("-", "_")) for m in cli.MODELS)
    assert all(apb.Dimension.Value("DIMENSION_" + d.upper()) for d in cli.DIMENSIONS)


# -- status ----------------------------------------------------------------------------------


async def test_status_shows_every_service_serving_with_consumer_lag_and_outbox_depth(stack: Stack) -> None:
    # A destination nobody listens at: its deliveries wait in the outbox, retrying.
    event = "Status " + secrets.token_hex(3)
    dest = await stack.export_stub.CreateDestination(
        destination(stack, base_url=f"http://127.0.0.1:{free_port()}", token="meta-token", event=event)
    )
    await stack.export_stub.UploadOfflineConversions(
        epb.UploadOfflineConversionsRequest(source="pos", conversions=[conversion("st-1", event)])
    )
    dest_id = dest.name.removeprefix("destinations/")
    try:

        async def status_with_outbox() -> tuple[int, str] | None:
            code, out, _ = await run(stack, "status")
            rows = [line.split() for line in out.splitlines()]
            return (code, out) if any(r[:1] == [dest_id] and int(r[1]) >= 1 for r in rows) else None

        code, out = await eventually(
            status_with_outbox, timeout=15, message="the outbox never showed a depth"
        )
    finally:
        await stack.export_stub.UpdateDestination(
            epb.UpdateDestinationRequest(
                destination=epb.Destination(name=dest.name, enabled=False),
                update_mask=field_mask_pb2.FieldMask(paths=["enabled"]),
            )
        )
    assert code == 0, out
    lines = out.splitlines()
    health = {line.split()[0]: line.split()[2] for line in lines[1:6]}
    assert health == {name: "SERVING" for name in ("gateway", "ingest", "identity", "attribution", "export")}
    assert all(line.split()[3] == "ok" for line in lines[2:6]), out  # every /metrics was read
    # The consumer-lag section lists at least identity's consumer, with a number of events.
    lag = lines[lines.index("consumer lag") + 2 : lines.index("export outbox")]
    assert any(
        row.split()[0] == "identity" and row.split()[1].replace(",", "").isdigit() for row in lag if row
    ), out


async def test_status_fails_and_names_the_service_that_is_down(stack: Stack) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    out, err = io.StringIO(), io.StringIO()
    argv = [
        *stack.flags(),
        "--attribution",
        nowhere,
        "--attribution-metrics",
        f"http://{nowhere}/metrics",
        "status",
    ]
    code = await asyncio.to_thread(cli.main, argv, out=out, err=err)
    assert code == 1
    health = {line.split()[0]: line.split()[2] for line in out.getvalue().splitlines()[1:6]}
    assert health["attribution"] == "UNREACHABLE"
    assert health["ingest"] == health["export"] == health["gateway"] == "SERVING"


# -- send ------------------------------------------------------------------------------------


async def test_send_track_identify_page_are_stored_and_the_answer_is_printed(stack: Stack) -> None:
    user = "u-send-" + secrets.token_hex(3)
    k = ["-k", stack.write_key, "--user-id", user]
    code, out, err = await run(stack, "send", "track", *k, "--event", "CLI Test", "--properties", '{"n": 1}')
    assert code == 0, out + err
    assert "-> 200" in out and '"success": true' in out
    ids = sent_ids(out)
    code, out, err = await run(stack, "send", "identify", *k, "--traits", '{"plan": "pro"}')
    assert code == 0, out + err
    ids += sent_ids(out)
    code, out, err = await run(
        stack, "send", "page", *k, "--name", "Home", "--url", "https://shop.example/?a=1"
    )
    assert code == 0, out + err
    ids += sent_ids(out)
    code, out, err = await run(stack, "send", "track", *k, "--event", "Batch Test", "--count", "3")
    assert code == 0, out + err
    assert "/v1/batch -> 200" in out
    batch_ids = sent_ids(out)
    assert len(batch_ids) == 2  # the first and the last are printed
    rows = {r["message_id"]: r for r in await stored(stack.pool, ids)}
    assert set(rows) == set(ids)
    assert [rows[i]["type"] for i in ids] == ["track", "identify", "page"]
    assert rows[ids[0]]["event"] == "CLI Test" and rows[ids[0]]["properties"] == {"n": 1}
    assert all(r["user_id"] == user for r in rows.values())
    n = await stack.pool.fetchval(
        "select count(*) from ingest.events where user_id = $1 and event = 'Batch Test'", user
    )
    assert n == 3


async def test_send_refused_prints_the_answer_and_fails(stack: Stack) -> None:
    code, out, _ = await run(stack, "send", "track", "-k", "wk_nobody", "--user-id", "u", "--event", "X")
    assert code == 1
    assert "-> 401" in out and "invalid_write_key" in out
    assert await stored(stack.pool, sent_ids(out)) == []
    code, _, err = await run(stack, "send", "track", "-k", stack.write_key, "--user-id", "u")
    assert code == 2 and "--event" in err
    code, _, err = await run(
        stack, "send", "track", "-k", stack.write_key, "--event", "X", "--properties", "[1]"
    )
    assert code == 2 and "--properties" in err


# -- profile and report ----------------------------------------------------------------------


async def test_profile_shows_identifiers_traits_and_the_cross_device_journey(stack: Stack) -> None:
    user = "u-prof-" + secrets.token_hex(3)
    laptop, phone = "anon-laptop-" + secrets.token_hex(3), "anon-phone-" + secrets.token_hex(3)
    k = ["-k", stack.write_key]
    steps = [
        [
            "page",
            "--anonymous-id",
            laptop,
            "--name",
            "Landing",
            "--url",
            "https://shop.example/?utm_campaign=toast",
        ],
        ["identify", "--anonymous-id", laptop, "--user-id", user, "--traits", '{"email": "p@example.com"}'],
        ["track", "--anonymous-id", phone, "--user-id", user, "--event", "Order Completed"],
    ]
    ids = []
    for step in steps:
        code, out, err = await run(stack, "send", *step, *k)
        assert code == 0, out + err
        ids += sent_ids(out)
    await stack.identity.wait_caught_up(timeout=15)

    code, out, err = await run(stack, "profile", f"user_id:{user}")
    assert code == 0, out + err
    assert re.match(r"^profiles/\S+\s+\(space default\)", out)
    section = out[out.index("identifiers") : out.index("traits")]
    assert {("user_id", user), ("anonymous_id", laptop), ("anonymous_id", phone)} <= {
        tuple(line.split()[:2]) for line in section.splitlines()[2:]
    }
    assert re.search(r'^\s+email\s+"p@example.com"', out, re.M)
    journey = out[out.index("journey (3 events)") :].splitlines()[2:]
    assert [line.split()[-1] for line in journey] == ids  # in event-time order
    assert "toast" in journey[0] and "Order Completed" in journey[2]

    # The same profile by its name.
    name = out.split()[0]
    code, by_name, _ = await run(stack, "profile", name, "--events", "1")
    assert code == 0 and "journey (1 event, more exist)" in by_name

    code, _, err = await run(stack, "profile", "user_id:nobody-" + secrets.token_hex(3))
    assert code == 2 and "NOT_FOUND" in err


async def test_report_prints_the_campaign_table(stack: Stack) -> None:
    campaign = "cli-camp-" + secrets.token_hex(3)
    anon = "anon-rep-" + secrets.token_hex(3)
    url = f"https://shop.example/?utm_campaign={campaign}&utm_source=newsletter&utm_medium=email"
    k = ["-k", stack.write_key, "--anonymous-id", anon]
    code, out, err = await run(stack, "send", "page", *k, "--url", url)
    assert code == 0, out + err
    props = '{"order_id": "o-cli-1", "revenue": 25.0, "currency": "USD"}'
    code, out, err = await run(
        stack, "send", "track", *k, "--event", "Order Completed", "--properties", props
    )
    assert code == 0, out + err

    async def applied() -> bool:
        return (await stack.attribution.consumer.lag())[0] == 0

    await eventually(applied, timeout=15)
    day = timedelta(days=1)
    window = [
        "--from",
        (datetime.now(UTC) - day).date().isoformat(),
        "--to",
        (datetime.now(UTC) + day).date().isoformat(),
    ]
    code, out, err = await run(
        stack, "report", *window, "--model", "last-touch", "--group-by", "campaign,source"
    )
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith("campaign report") and "model last-touch" in lines[0]
    assert lines[1].split() == [
        "CAMPAIGN",
        "SOURCE",
        "CONVERSIONS",
        "REVENUE",
        "SPEND",
        "ROAS",
        "CPA",
        "TOUCHED",
    ]
    mine = [line.split() for line in lines if line.startswith(campaign)]
    assert mine == [[campaign, "newsletter", "1.00", "25.00", "-", "-", "-", "1"]]
    assert lines[-1].startswith("total: ")

    code, _, err = await run(stack, "report", "--group-by", "planet")
    assert code == 2 and "planet" in err


# -- import ----------------------------------------------------------------------------------


async def test_import_reuses_the_export_importer_with_a_progress_bar(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = secrets.token_hex(3)
    csv_file = tmp_path / "purchases.csv"
    csv_file.write_text(
        "order_id,event_name,event_time,value,currency,email,colour\n"
        f"imp-{tag}-1,Purchase,2026-03-01T14:05:00Z,10.5,USD,a@example.com,red\n"
        f"imp-{tag}-2,Purchase,2026-03-01 15:00:00-05:00,20,EUR,b@example.com,blue\n"
        f"imp-{tag}-3,Purchase,yesterday,5,USD,c@example.com,green\n"
    )
    errors = tmp_path / "errors.csv"
    source = "pos-" + tag
    code, out, _ = await run(stack, "import", str(csv_file), "--source", source, "--errors", str(errors))
    assert code == 1, out  # one row refused
    assert "ignored unknown columns: colour" in out
    assert f"row 4 (order imp-{tag}-3): error event_time INVALID_TIME" in out
    assert "rows 3: accepted 2, duplicates 0, rejected 1" in out
    assert "importing" in capsys.readouterr().err  # tqdm's bar, on stderr
    assert "INVALID_TIME" in errors.read_text()
    status = await stack.export_stub.GetDeliveryStatus(
        epb.GetDeliveryStatusRequest(
            order_ids=[f"imp-{tag}-1", f"imp-{tag}-2", f"imp-{tag}-3"], source=source
        )
    )
    assert sorted(c.order_id for c in status.conversions) == [f"imp-{tag}-1", f"imp-{tag}-2"]

    # Imported again: the same orders are duplicates, nothing new is stored.
    code, out, _ = await run(stack, "import", str(csv_file), "--source", source, "--no-progress")
    assert code == 1 and "accepted 0, duplicates 2, rejected 1" in out
    assert capsys.readouterr().err == ""

    code, _, err = await run(stack, "import", str(tmp_path / "missing.csv"), "--source", source)
    assert code == 2 and "cannot import" in err


# -- dead letters ----------------------------------------------------------------------------


async def test_dead_letters_are_listed_and_replayed(stack: Stack) -> None:
    event = "Dead " + secrets.token_hex(3)
    dest = await stack.export_stub.CreateDestination(
        destination(stack, base_url=stack.receivers.base_url, token="wrong-token", event=event)
    )
    dest_id = dest.name.removeprefix("destinations/")
    order = "dl-" + secrets.token_hex(3)
    await stack.export_stub.UploadOfflineConversions(
        epb.UploadOfflineConversionsRequest(source="pos", conversions=[conversion(order, event)])
    )

    async def listed() -> str:
        code, out, err = await run(stack, "dead-letters", "list", "--destination", dest_id)
        assert code == 0, out + err
        return out if order in out else ""

    out = await eventually(listed, timeout=10, message="the delivery was never dead-lettered")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "DESTINATION", "ORDER", "REASON"]
    row = lines[1].split()
    assert row[1:4] == [dest.name, order, "UNAUTHORIZED"] and row[0].startswith("deliveries/")
    assert lines[-1] == "1 dead letter"

    code, _, err = await run(stack, "dead-letters", "replay")
    assert code == 2 and "--all" in err

    await stack.export_stub.UpdateDestination(
        epb.UpdateDestinationRequest(
            destination=epb.Destination(name=dest.name, credentials={"access_token": "meta-token"}),
            update_mask=field_mask_pb2.FieldMask(paths=["credentials"]),
        )
    )
    assert stack.export.deliverer is not None
    await stack.export.deliverer.reload_now()
    code, out, err = await run(stack, "dead-letters", "replay", "--destination", dest.name)
    assert (code, out) == (0, "replayed 1 dead letter\n"), err
    await eventually(lambda: f"{event}:{order}" in stack.receivers.meta.effects, timeout=10)
    code, out, _ = await run(stack, "dead-letters", "list", "--destination", dest_id)
    assert code == 0 and out.splitlines()[-1] == "0 dead letters"
    # Replaying by name something that is not dead replays nothing.
    code, out, _ = await run(stack, "dead-letters", "replay", row[0])
    assert (code, out) == (0, "replayed 0 dead letters\n")
