"""The server bootstrap every service uses: grpc.aio with the metrics and error interceptor,
the standard grpc.health.v1 service, reflection, Prometheus /metrics, and a graceful shutdown
on SIGTERM/SIGINT that drains in-flight calls.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from prometheus_client import Counter, Histogram, start_http_server

from touchpoint.platform.errors import ServiceError, unavailable

log = logging.getLogger(__name__)

_RPC_METRICS: dict[str, tuple[Counter, Histogram]] = {}


def rpc_metrics(service: str) -> tuple[Counter, Histogram]:
    """RED metrics of a service's RPCs (one set per service name in this process)."""
    if service not in _RPC_METRICS:
        _RPC_METRICS[service] = (
            Counter(
                f"touchpoint_{service}_rpc_handled_total",
                "RPCs completed, by method and gRPC status code.",
                ["method", "code"],
            ),
            Histogram(
                f"touchpoint_{service}_rpc_duration_seconds",
                "Time to handle an RPC, by method.",
                ["method"],
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            ),
        )
    return _RPC_METRICS[service]


# Errors that mean the database cannot be reached right now: answered UNAVAILABLE (retryable).
DB_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    # Raised when the pool hands back a connection the server already closed (the pool discards
    # it; MagicStack/asyncpg#784): the database went away, not a bug of ours.
    asyncpg.exceptions.InternalClientError,
    asyncio.TimeoutError,
)


class MetricsAndErrorsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC, and maps exceptions to google.rpc.Status answers."""

    def __init__(self, service: str) -> None:
        self.handled, self.duration = rpc_metrics(service)
        # The wrapped handler of each method, built on its first call: the servicer's handlers
        # do not change while the server runs, and building one per call costs every RPC.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        cached = self._wrapped.get(handler_call_details.method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        handled_ok = self.handled.labels(method, grpc.StatusCode.OK.name)
        handled, duration = self.handled, self.duration.labels(method)

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await inner(request, context)
            except ServiceError as service_error:
                code = service_error.code
                await context.abort_with_status(rpc_status.to_status(service_error.to_status()))
            except DB_DOWN_ERRORS as exc:
                code = grpc.StatusCode.UNAVAILABLE
                log.warning("database unavailable", extra={"method": method, "error": repr(exc)})
                down = unavailable("DATABASE_UNAVAILABLE", "the database cannot be reached; retry later")
                await context.abort_with_status(rpc_status.to_status(down.to_status()))
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                # context.abort raises an exception of grpc's own: let it through untouched.
                if type(exc).__name__ == "AbortError":
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error", extra={"method": method})
                internal = ServiceError(
                    grpc.StatusCode.INTERNAL, "INTERNAL", "internal error; see the server log"
                )
                await context.abort_with_status(rpc_status.to_status(internal.to_status()))
            finally:
                (handled_ok if code is grpc.StatusCode.OK else handled.labels(method, code.name)).inc()
                duration.observe(time.perf_counter() - start)

        wrapped_handler = grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[handler_call_details.method] = wrapped_handler
        return wrapped_handler


@dataclass
class ServerHandle:
    """A started server: its ports and how to stop it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    metrics_port: int | None
    service_names: Sequence[str]
    _metrics_server: Any = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float) -> None:
        """Marks NOT_SERVING, refuses new calls, drains in-flight ones for up to `grace` s."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()


async def start_server(
    *,
    service: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    listen: str,
    metrics_port: int | None,
    options: Sequence[tuple[str, Any]] = (),
    reuse_port: bool = False,
) -> ServerHandle:
    """Builds and starts a gRPC server the one way every service does.

    `register` adds the servicers; `service_names` are their full names (for health and
    reflection). `listen` is host:port (tests pass "127.0.0.1:0"); `metrics_port` None means no
    /metrics endpoint (the gateway serves its own), 0 means any free port.
    """
    server = grpc.aio.server(
        interceptors=[MetricsAndErrorsInterceptor(service)],
        options=[
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *options,
        ],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen}")
    await server.start()
    for name in [*service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_server = None
    bound_metrics = None
    if metrics_port is not None:
        metrics_server, _thread = start_http_server(metrics_port)
        bound_metrics = metrics_server.server_port
    log.info("serving", extra={"service": service, "port": port, "metrics_port": bound_metrics})
    return ServerHandle(server, health_servicer, port, bound_metrics, list(service_names), metrics_server)


async def wait_for_shutdown_signal() -> str:
    """Returns when SIGTERM or SIGINT arrives; the name of the signal."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not got.done():
            got.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await got
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs a service's async main on uvloop."""
    import uvloop

    uvloop.run(main())


def tune_gc(young: int = 50_000, middle: int = 20, old: int = 100) -> None:
    """Call once a service's process is set up (measured in bench/ingest, bench/identity and
    bench/export). A request or a consumer batch allocates tens of thousands of short-lived
    containers that reference counting frees and that form few cycles: with the default
    thresholds (700, 10, 10) the cyclic collector ran every few hundred events and took a tenth
    to a quarter of each service's CPU, and its full collections walked every long-lived object
    (modules, protobuf descriptors, grpc and aiohttp state), pauses callers see. Everything start-up
    created is frozen out of the collector, and young objects are collected far less often."""
    gc.freeze()
    gc.set_threshold(young, middle, old)
