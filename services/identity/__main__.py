"""Composition root of the identity service: settings -> pool -> app -> serve until SIGTERM."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import asyncpg

import services.identity
from services.identity.app import IdentitySettings, start_identity
from touchpoint.platform.db import create_pool
from touchpoint.platform.logs import setup_logging
from touchpoint.platform.server import run, tune_gc, wait_for_shutdown_signal
from touchpoint.platform.settings import CommonSettings
from touchpoint.platform.workers import WORKER_ENV, is_worker, supervise


async def keep_session(conn: asyncpg.Connection) -> None:
    """Returns a connection to the pool as it is (asyncpg rolls back an open transaction and
    drops its listener callbacks before calling this). The default reset (unlock advisory
    locks, close cursors, unlisten, reset settings) is one more round trip on every release:
    it doubled ResolveProfile's. This service leaves none of that state on a pooled connection:
    its settings are `set local`, the migration lock is released explicitly, it opens no
    cursors outside transactions, and a stale LISTEN only delivers notices nobody reads."""


# grpc.aio leaves a reference cycle of five objects behind every call it serves (its method
# lookup's closure: _find_method_handler in grpc/_cython/_cygrpc/aio/server.pyx.pxi), which only
# the cyclic collector frees. With tune_gc's default young threshold (50,000) one collection
# freed 10,000 calls' worth at once: a 34-77 ms pause every 20 s at 500 resolves/s, while every
# call in flight waited (bench/identity, stop 15). At 2,000 the same collector time comes as
# ~2.7 ms every 400 calls. The consumer holds the collector off while it applies a batch
# (stitcher._no_cyclic_gc), so its own work is not walked any more often.
API_GC_YOUNG = 2_000


async def main() -> None:
    common = CommonSettings.from_env()
    settings = IdentitySettings.from_env()
    if is_worker():
        first = os.environ[WORKER_ENV] == "0"
        settings = dataclasses.replace(
            settings,
            metrics_port=None,  # the supervisor serves every worker's
            consume=settings.consume and first,
            maintenance=settings.maintenance and first,
        )
        if settings.consume:
            # The worker applying the log keeps its event loop busy for tens of milliseconds
            # per batch: it stays off the shared port, so no caller waits behind a batch.
            settings = dataclasses.replace(settings, listen="127.0.0.1:0", workers=1)
    setup_logging("identity", common.log_level)
    if services.identity.NATIVE:
        logging.getLogger(__name__).info("graph step compiled (build/native)")
    else:
        logging.getLogger(__name__).warning(
            "graph step from source: build/native is missing, stale or off (TOUCHPOINT_NATIVE=0); "
            "`make native` compiles it"
        )
    pool = await create_pool(common.database_url, max_size=common.db_pool_size, reset=keep_session)
    try:
        app = await start_identity(pool, settings)
        tune_gc(young=API_GC_YOUNG)
        await wait_for_shutdown_signal()
        await app.stop(common.shutdown_grace_seconds)
    finally:
        await pool.close()


if __name__ == "__main__":
    workers = IdentitySettings.from_env().workers
    if workers > 1 and not is_worker():
        sys.exit(supervise("services.identity", workers, IdentitySettings.from_env().metrics_port))
    run(main)
