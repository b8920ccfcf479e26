"""Test helpers: a real Postgres, fresh databases, servers on port 0, and `eventually`."""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from touchpoint.platform.embedded import start_embedded


def start_test_postgres() -> tuple[str, Any]:
    """TOUCHPOINT_TEST_DATABASE_URL when set (an existing server), else a temporary embedded one."""
    url = os.environ.get("TOUCHPOINT_TEST_DATABASE_URL")
    if url:
        return url, None
    folder = Path(tempfile.mkdtemp(prefix="tp-pg-")) / "data"
    return start_embedded(folder, delete_on_exit=True)


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database (keeps a ?host= socket query)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def create_database(admin_url: str, prefix: str = "tp_test") -> str:
    """Creates an empty database on the server; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


async def eventually(
    check: Callable[[], Any],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition never held",
) -> Any:
    """Calls `check` until it returns a truthy value (returned) or raises nothing; fails after
    `timeout` with the last value or exception. Use it instead of sleeping in tests."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                result = await result
            if result:
                return result
            last = result
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout}s; last: {last!r}")
        await asyncio.sleep(interval)
