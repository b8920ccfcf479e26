"""Where a bench's Postgres time goes, statement by statement.

`StatementProfile` wraps asyncpg's query and COPY methods (process-wide, while installed) and
counts, per statement, the calls, their wall time, and the CPU the Postgres backend serving each
call used meanwhile, read from /proc (a server on this machine only; elsewhere it is left out).
/proc counts CPU in clock ticks (10 ms): a single short statement reads 0 or 10 ms, and only sums
over many calls mean something, which is what a bench makes. For benches and investigations,
not for services: it patches asyncpg's classes for the whole process.

    with StatementProfile() as prof:
        applied = await consumer.catch_up()
    print(prof.report(applied))
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import asyncpg

# The asyncpg.Connection methods that send statements (a pool's connection proxies call them).
METHODS = (
    "execute",
    "executemany",
    "fetch",
    "fetchrow",
    "fetchval",
    "copy_records_to_table",
    "copy_to_table",
)
_TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float | None:
    """CPU seconds used so far by the process `pid` (None when this machine does not have it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * _TICK  # utime, stime


def label(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A statement's name in the report: COPY and its table, or the query's start."""
    if method.startswith("copy_"):
        table = args[0] if args else kwargs.get("table_name", "?")
        return f"COPY {table}"
    query = args[0] if args else kwargs.get("query", "?")
    return " ".join(str(query).split())[:72]


class StatementProfile:
    """Calls, wall seconds and backend CPU seconds per statement label (see the module's doc)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.wall: defaultdict[str, float] = defaultdict(float)
        self.cpu: defaultdict[str, float] = defaultdict(float)
        # Whether every call's backend CPU could be read.
        self.cpu_known = True
        self._saved: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        if self._saved:
            raise RuntimeError("this profile is installed already")
        for name in METHODS:
            original = getattr(asyncpg.Connection, name)
            self._saved[name] = original
            setattr(asyncpg.Connection, name, self._wrap(name, original))

    def uninstall(self) -> None:
        for name, original in self._saved.items():
            setattr(asyncpg.Connection, name, original)
        self._saved.clear()

    def __enter__(self) -> StatementProfile:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        profile = self

        @functools.wraps(original)
        async def wrapped(conn: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
            key = label(name, args, kwargs)
            pid = conn.get_server_pid()
            cpu0 = backend_cpu(pid)
            t0 = time.perf_counter()
            try:
                return await original(conn, *args, **kwargs)
            finally:
                profile.wall[key] += time.perf_counter() - t0
                profile.calls[key] += 1
                cpu1 = backend_cpu(pid)
                if cpu0 is None or cpu1 is None:
                    profile.cpu_known = False
                else:
                    profile.cpu[key] += cpu1 - cpu0

        return wrapped

    def report(self, events: int, top: int = 15) -> str:
        """The `top` statements by backend CPU (by wall time when CPU is unknown), per event."""
        n = max(1, events)
        order = self.cpu if self.cpu_known else self.wall
        keys = sorted(self.calls, key=lambda k: -order[k])[:top]
        lines = []
        for k in keys:
            cpu = f"{self.cpu[k] / n * 1e6:7.1f}" if self.cpu_known else "      –"
            lines.append(f"{cpu} µs pg {self.wall[k] / n * 1e6:7.1f} µs wall {self.calls[k]:7,}×  {k}")
        total = f"{sum(self.cpu.values()) / n * 1e6:.1f}" if self.cpu_known else "unknown (server elsewhere)"
        lines.append(f"all statements: Postgres CPU {total} µs/event")
        return "\n".join(lines)
