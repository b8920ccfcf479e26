"""`make run`: Postgres (embedded unless TOUCHPOINT_DATABASE_URL is set), migrations, a source for
TOUCHPOINT_WRITE_KEY, then every service of the repo as its own process until Ctrl-C/SIGTERM."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from touchpoint.platform.db import create_pool, migrate
from touchpoint.platform.embedded import start_embedded
from touchpoint.platform.testing import with_database

ROOT = Path(__file__).resolve().parents[4]
DATA = ROOT / ".data"
# Start order: ingest first (it owns the event log), the gateway last (it needs ingest).
SERVICES = ("ingest", "identity", "attribution", "export", "gateway")


def say(text: str) -> None:
    print(f"touchpoint | {text}", flush=True)


def _keep_or_make(env: str, file: Path) -> str:
    value = os.environ.get(env, "")
    if value:
        return value
    if file.exists():
        return file.read_text().strip()
    value = "tp_" + secrets.token_urlsafe(18)
    file.write_text(value + "\n")
    file.chmod(0o600)
    return value


async def prepare(url: str) -> tuple[str, str, str]:
    """Creates the touchpoint database if needed, applies ingest's migrations, ensures the
    default source; returns (database url, write key, read key)."""
    conn = await asyncpg.connect(url)
    try:
        exists = await conn.fetchval("select 1 from pg_database where datname = 'touchpoint'")
        if not exists and "/touchpoint" not in url.split("?")[0]:
            await conn.execute("create database touchpoint")
    finally:
        await conn.close()
    db_url = url if "/touchpoint" in url.split("?")[0] else with_database(url, "touchpoint")
    from services.ingest.app import MIGRATIONS
    from services.ingest.store import create_source

    pool = await create_pool(db_url, max_size=2)
    try:
        await migrate(pool, "ingest", MIGRATIONS)
        write_key = _keep_or_make("TOUCHPOINT_WRITE_KEY", DATA / "write_key")
        read_key = _keep_or_make("TOUCHPOINT_READ_KEY", DATA / "read_key")
        await create_source(pool, write_key=write_key, name="default", source_id="default")
    finally:
        await pool.close()
    return db_url, write_key, read_key


def main() -> int:
    DATA.mkdir(exist_ok=True)
    url = os.environ.get("TOUCHPOINT_DATABASE_URL", "")
    handle = None
    if not url:
        url, handle = start_embedded(DATA / "postgres")
        say(f"embedded Postgres 18 with its data in {DATA / 'postgres'}")
    db_url, write_key, read_key = asyncio.run(prepare(url))
    say(f"write key: {write_key}   (HTTP Basic user name, empty password)")
    say(f"read key:  {read_key}   (for GET /v1/profiles/..., /v1/reports/...)")

    env = dict(os.environ, TOUCHPOINT_DATABASE_URL=db_url, TOUCHPOINT_READ_KEY=read_key)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for name in SERVICES:
        if (ROOT / "services" / name / "__main__.py").exists():
            procs[name] = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=env)
            say(f"started {name} (pid {procs[name].pid})")
    say("gateway on http://127.0.0.1:8080 ; Ctrl-C stops everything")
    code = 0
    while not stopping:
        for name, proc in procs.items():
            if proc.poll() is not None:
                say(f"{name} exited with {proc.returncode}; stopping the others")
                code = 1
                stopping = True
                break
        time.sleep(0.2)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for name, proc in procs.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop in time; killing it")
            proc.kill()
    if handle is not None:
        handle.cleanup()
        say("embedded Postgres stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
