"""Composition root of the export service: settings -> pool -> app -> serve until SIGTERM."""

from __future__ import annotations

import dataclasses
import gc
import sys

from services.export.app import ExportSettings, start_export
from touchpoint.platform.db import create_pool
from touchpoint.platform.logs import setup_logging
from touchpoint.platform.server import run, wait_for_shutdown_signal
from touchpoint.platform.settings import CommonSettings
from touchpoint.platform.workers import is_worker, supervise


async def main() -> None:
    common = CommonSettings.from_env()
    settings = ExportSettings.from_env()
    if is_worker():
        settings = dataclasses.replace(settings, metrics_port=None)  # the supervisor serves them
    setup_logging("export", common.log_level)
    pool = await create_pool(common.database_url, max_size=common.db_pool_size)
    try:
        app = await start_export(pool, settings)
        # Each request and each delivery batch allocates tens of thousands of objects (rows,
        # dicts, records) that never form cycles. With the default thresholds the collector ran
        # about 13 times per 1,000 conversions, some of them full collections: a tenth of the
        # process's CPU. Collect less often, and never traverse what startup created again.
        gc.set_threshold(20_000, 50, 50)
        gc.freeze()
        await wait_for_shutdown_signal()
        await app.stop(common.shutdown_grace_seconds)
    finally:
        await pool.close()


if __name__ == "__main__":
    workers = ExportSettings.from_env().workers
    if workers > 1 and not is_worker():
        sys.exit(supervise("services.export", workers, ExportSettings.from_env().metrics_port))
    run(main)
