"""Composition root of the gateway: settings -> ingest channels -> app -> serve until SIGTERM."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2_grpc

from services.gateway.app import IngestWriter, build_app, open_ingest_channel, serve
from services.gateway.read_api import ReadApi
from services.gateway.settings import GatewaySettings
from touchpoint.attribution.v1 import attribution_service_pb2_grpc
from touchpoint.identity.v1 import identity_service_pb2_grpc
from touchpoint.ingest.v1 import ingest_service_pb2_grpc
from touchpoint.platform.logs import setup_logging
from touchpoint.platform.server import run, tune_gc, wait_for_shutdown_signal

log = logging.getLogger("services.gateway")


async def main() -> None:
    settings = GatewaySettings.from_env()
    setup_logging("gateway", settings.log_level)
    channels = [
        open_ingest_channel(settings.ingest_addr, own_connection=True)
        for _ in range(settings.ingest_connections)
    ]
    read_channels = []
    read_api = None
    if settings.read_key:
        read_channels = [
            grpc.aio.insecure_channel(settings.identity_addr),
            grpc.aio.insecure_channel(settings.attribution_addr),
        ]
        read_api = ReadApi(
            settings.read_key,
            identity_service_pb2_grpc.IdentityServiceStub(read_channels[0]),
            attribution_service_pb2_grpc.AttributionServiceStub(read_channels[1]),
        )
    try:
        app = build_app(
            IngestWriter([ingest_service_pb2_grpc.IngestServiceStub(ch) for ch in channels]),
            settings,
            health=health_pb2_grpc.HealthStub(channels[0]),
            read_api=read_api,
        )
        server = await serve(app, settings)
        tune_gc()  # the cyclic collector cost a quarter of the gateway's CPU (bench/ingest)
        signal_name = await wait_for_shutdown_signal()
        log.info("stopping", extra={"signal": signal_name})
        # Closes the listener, then waits for in-flight requests (and their ingest calls)
        # up to shutdown_grace_seconds, before the channels close.
        await server.stop()
    finally:
        for ch in [*channels, *read_channels]:
            await ch.close()


if __name__ == "__main__":
    run(main)
