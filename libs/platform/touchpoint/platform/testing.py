"""Test helpers: a real Postgres, fresh databases, servers on port 0, and `eventually`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

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


# The repository root: service processes run from it.
_ROOT = Path(__file__).resolve().parents[4]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """`python -m services.<name>` as a child process; its gRPC/HTTP port read from its
    'serving' log line."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = {**os.environ, "TOUCHPOINT_LOG_LEVEL": "INFO", **env}
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._port: asyncio.Future[int] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self._port = asyncio.get_running_loop().create_future()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{self.name}", cwd=_ROOT, env=self.env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        return await asyncio.wait_for(self._port, 30)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None and self._port is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            self.log.append(line)
            with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
                doc = orjson.loads(line)
                if doc.get("msg") == "serving" and not self._port.done():
                    self._port.set_result(int(doc["port"]))
        if not self._port.done():
            self._port.set_exception(
                RuntimeError(f"{self.name} exited before serving:\n" + "\n".join(self.log[-20:]))
            )

    async def kill(self) -> None:
        """SIGKILL: no drain, no flush, no goodbye."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.send_signal(signal.SIGKILL)
                await self.proc.wait()
        if self._reader is not None:
            await self._reader
