"""Fixtures shared by every test: one real Postgres per session, a fresh database per module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from touchpoint.platform.db import create_pool
from touchpoint.platform.testing import create_database, start_test_postgres


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url, handle = start_test_postgres()
    yield url
    if handle is not None:
        handle.cleanup()


@pytest.fixture(scope="module")
async def database_url(pg_server_url: str) -> str:
    """A new empty database for each test module, on the session's server."""
    return await create_database(pg_server_url)


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(database_url, max_size=8)
    yield p
    await p.close()
