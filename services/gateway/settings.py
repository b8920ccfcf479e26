"""The gateway's settings, read once from the environment by the composition root."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

from touchpoint.platform.settings import SettingsError, env_float, env_int, env_list, env_str

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::]:8080`) as (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise SettingsError(f"a listen address must be host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """IPs and CIDRs (`10.0.0.1`, `10.0.0.0/8`, `fd00::/8`) as networks."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise SettingsError(f"not an IP address or CIDR: {value!r}") from exc
    return tuple(out)


@dataclass(frozen=True)
class GatewaySettings:
    # HTTP listen address (host:port); the API, /metrics and /health share it.
    listen: str = "0.0.0.0:8080"
    # Address of the ingest service's gRPC server.
    ingest_addr: str = "127.0.0.1:50051"
    # Addresses of the identity and attribution services, for the read API.
    identity_addr: str = "127.0.0.1:50052"
    attribution_addr: str = "127.0.0.1:50053"
    # The read key of GET /v1/profiles/... and /v1/reports/...; empty: the read API is off.
    read_key: str = ""
    # Proxies whose X-Forwarded-For is believed (IPs or CIDRs); requests from anything else are
    # taken at their socket address, so a client cannot forge its IP.
    trusted_proxies: tuple[IPNetwork, ...] = field(default_factory=tuple)
    # Seconds an IngestService call may take before the request is answered 503.
    ingest_timeout_seconds: float = 10.0
    # Seconds /health waits for ingest's health service.
    health_timeout_seconds: float = 2.0
    # Connections to ingest, used in turn: ingest's worker processes share one port and the
    # kernel spreads connections over them, not calls.
    ingest_connections: int = 4
    # Seconds a stopping gateway lets in-flight requests finish.
    shutdown_grace_seconds: float = 10.0
    # Log level of the root logger.
    log_level: str = "INFO"

    @classmethod
    def from_env(cls) -> GatewaySettings:
        listen = env_str("TOUCHPOINT_GATEWAY_LISTEN", cls.listen)
        parse_listen(listen)  # fail at start, not at bind time
        return cls(
            listen=listen,
            ingest_addr=env_str("TOUCHPOINT_INGEST_ADDR", cls.ingest_addr),
            identity_addr=env_str("TOUCHPOINT_IDENTITY_ADDR", cls.identity_addr),
            attribution_addr=env_str("TOUCHPOINT_ATTRIBUTION_ADDR", cls.attribution_addr),
            read_key=env_str("TOUCHPOINT_READ_KEY", ""),
            trusted_proxies=parse_networks(env_list("TOUCHPOINT_GATEWAY_TRUSTED_PROXIES")),
            ingest_timeout_seconds=env_float("TOUCHPOINT_GATEWAY_INGEST_TIMEOUT_SECONDS", 10.0),
            health_timeout_seconds=env_float("TOUCHPOINT_GATEWAY_HEALTH_TIMEOUT_SECONDS", 2.0),
            ingest_connections=env_int("TOUCHPOINT_GATEWAY_INGEST_CONNECTIONS", 4, minimum=1),
            shutdown_grace_seconds=env_float("TOUCHPOINT_SHUTDOWN_GRACE_SECONDS", 10.0),
            log_level=env_str("TOUCHPOINT_LOG_LEVEL", "INFO"),
        )

    @classmethod
    def for_tests(cls, ingest_addr: str, **overrides: Any) -> GatewaySettings:
        return replace(
            cls(listen="127.0.0.1:0", ingest_addr=ingest_addr, ingest_timeout_seconds=5.0), **overrides
        )
