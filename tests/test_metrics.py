"""Every service's /metrics, scraped from the real processes after real traffic, passes
`promtool check metrics` (Prometheus' own exposition-format and naming lint)."""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import urllib.error
import urllib.request

import grpc
import orjson
import pytest

from services.ingest.app import IngestSettings, start_ingest
from services.ingest.store import create_source
from tests.test_deploy import tool
from touchpoint.events.v1 import event_pb2 as ev
from touchpoint.identity.v1 import identity_service_pb2 as id_pb
from touchpoint.identity.v1 import identity_service_pb2_grpc as id_grpc
from touchpoint.platform.db import create_pool
from touchpoint.platform.testing import ServiceProcess, create_database, eventually, free_port

SERVICES = ("ingest", "identity", "attribution", "export")


def _get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def promtool_check_metrics(body: bytes) -> str:
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    out = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, out
    return out


@pytest.mark.timeout(110)
async def test_every_service_metrics_output_passes_promtool(pg_server_url: str) -> None:
    url = await create_database(pg_server_url, "tp_metrics")
    pool = await create_pool(url, max_size=4)
    procs: dict[str, ServiceProcess] = {}
    try:
        app = await start_ingest(pool, IngestSettings.for_tests())  # migrations, so the source exists first
        await app.stop()
        key = "wk_" + secrets.token_hex(6)
        await create_source(pool, write_key=key, name="metrics")
        metrics_ports = {name: free_port() for name in SERVICES}
        base = {"TOUCHPOINT_DATABASE_URL": url, "TOUCHPOINT_LOG_LEVEL": "INFO"}
        env = {
            name: {
                **base,
                f"TOUCHPOINT_{name.upper()}_LISTEN": "127.0.0.1:0",
                f"TOUCHPOINT_{name.upper()}_METRICS_PORT": str(metrics_ports[name]),
            }
            for name in SERVICES
        }
        env["ingest"]["TOUCHPOINT_INGEST_WORKERS"] = "2"  # the multiprocess registry too
        procs["ingest"] = ServiceProcess("ingest", env["ingest"])
        ingest_port = await procs["ingest"].start()
        ingest_addr = f"127.0.0.1:{ingest_port}"
        for name in ("identity", "attribution", "export"):
            procs[name] = ServiceProcess(name, {**env[name], "TOUCHPOINT_INGEST_ADDR": ingest_addr})
        ports = dict(
            zip(
                ("identity", "attribution", "export"),
                await asyncio.gather(*(procs[n].start() for n in ("identity", "attribution", "export"))),
                strict=True,
            )
        )
        procs["gateway"] = ServiceProcess(
            "gateway",
            {
                **base,
                "TOUCHPOINT_GATEWAY_LISTEN": "127.0.0.1:0",
                "TOUCHPOINT_INGEST_ADDR": ingest_addr,
                "TOUCHPOINT_IDENTITY_ADDR": f"127.0.0.1:{ports['identity']}",
                "TOUCHPOINT_ATTRIBUTION_ADDR": f"127.0.0.1:{ports['attribution']}",
            },
        )
        gateway_port = await procs["gateway"].start()

        # Traffic, so that the labelled series exist: accepted and rejected events, a pixel, a
        # bad key, and calls to identity's API.
        auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
        batch = {
            "batch": [
                {"type": "track", "event": "Order Completed", "anonymousId": "a1", "userId": "u1",
                 "properties": {"revenue": 10, "order_id": "o1"},
                 "context": {"page": {"url": "https://shop.example/?utm_source=news&utm_medium=email"}}},
                {"type": "identify", "anonymousId": "a2", "userId": "u1", "traits": {"email": "a@b.example"}},
            ]
        }  # fmt: skip
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        batch_url = f"http://127.0.0.1:{gateway_port}/v1/batch"
        assert (await asyncio.to_thread(_get, batch_url, headers, orjson.dumps(batch)))[0] == 200
        bad = {"batch": [{"type": "track", "userId": "u2"}]}  # no event: rejected
        assert (await asyncio.to_thread(_get, batch_url, headers, orjson.dumps(bad)))[0] == 400
        wrong_key = {**headers, "Authorization": "Basic " + base64.b64encode(b"nope:").decode()}
        assert (await asyncio.to_thread(_get, batch_url, wrong_key, orjson.dumps(batch)))[0] == 401
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['identity']}") as ch:
            stub = id_grpc.IdentityServiceStub(ch)

            async def stitched() -> bool:
                try:
                    r = await stub.ResolveProfile(
                        id_pb.ResolveProfileRequest(
                            space_id="default", identifier=ev.Identifier(kind="user_id", value="u1")
                        )
                    )
                except grpc.aio.AioRpcError as err:  # NOT_FOUND until the consumer stitched it
                    if err.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    return False
                return bool(r.profile)

            await eventually(stitched, timeout=30)

        scrapes = {name: f"http://127.0.0.1:{metrics_ports[name]}/metrics" for name in SERVICES} | {
            "gateway": f"http://127.0.0.1:{gateway_port}/metrics"
        }
        for name, scrape in scrapes.items():
            status, body = await asyncio.to_thread(_get, scrape)
            assert status == 200, name
            assert f"touchpoint_{name}_rpc".encode() in body or name == "gateway", name
            assert b"touchpoint_" in body, name
            promtool_check_metrics(body)
    finally:
        for proc in procs.values():
            await proc.stop()
        await pool.close()


def test_the_check_fails_on_a_badly_named_counter() -> None:
    """The check above can fail: promtool rejects a counter without the _total suffix."""
    with pytest.raises(AssertionError, match="_total"):
        promtool_check_metrics(
            b"# HELP foo_requests Requests.\n# TYPE foo_requests counter\nfoo_requests 1\n"
        )
