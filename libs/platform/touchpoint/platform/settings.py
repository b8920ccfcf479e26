"""Settings read once from environment variables, each with its default and a one-line comment.

Every service has a frozen dataclass built by its composition root with ``from_env()``; nothing
else reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc


def env_list(name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class CommonSettings:
    """Settings every service shares."""

    # Postgres URL; `make run` starts an embedded server and sets it when unset.
    database_url: str
    # Log level of the root logger (DEBUG, INFO, WARNING, ERROR).
    log_level: str
    # Connections in this process's pool.
    db_pool_size: int
    # Seconds a draining server waits for in-flight calls on SIGTERM.
    shutdown_grace_seconds: float

    @classmethod
    def from_env(cls) -> CommonSettings:
        url = os.environ.get("TOUCHPOINT_DATABASE_URL", "")
        if not url:
            raise SettingsError(
                "TOUCHPOINT_DATABASE_URL is not set: start the services with `make run`, "
                "which provides an embedded Postgres, or point it at your server"
            )
        return cls(
            database_url=url,
            log_level=env_str("TOUCHPOINT_LOG_LEVEL", "INFO"),
            db_pool_size=env_int("TOUCHPOINT_DB_POOL_SIZE", 10, minimum=2),
            shutdown_grace_seconds=env_float("TOUCHPOINT_SHUTDOWN_GRACE_SECONDS", 10.0),
        )
