"""Composition root of the ingest service: settings -> pool -> app -> serve until SIGTERM."""

from __future__ import annotations

import dataclasses
import sys

from services.ingest.app import IngestSettings, start_ingest
from touchpoint.platform.db import create_pool
from touchpoint.platform.logs import setup_logging
from touchpoint.platform.server import run, tune_gc, wait_for_shutdown_signal
from touchpoint.platform.settings import CommonSettings
from touchpoint.platform.workers import is_worker, supervise


async def main() -> None:
    common = CommonSettings.from_env()
    settings = IngestSettings.from_env()
    if is_worker():
        settings = dataclasses.replace(settings, metrics_port=None)  # the supervisor serves them
    setup_logging("ingest", common.log_level)
    pool = await create_pool(common.database_url, max_size=common.db_pool_size)
    try:
        app = await start_ingest(pool, settings)
        tune_gc()  # the cyclic collector cost a fifth of ingest's CPU (bench/ingest)
        await wait_for_shutdown_signal()
        await app.stop(common.shutdown_grace_seconds)
    finally:
        await pool.close()


if __name__ == "__main__":
    workers = IngestSettings.from_env().workers
    if workers > 1 and not is_worker():
        sys.exit(supervise("services.ingest", workers, IngestSettings.from_env().metrics_port))
    run(main)
