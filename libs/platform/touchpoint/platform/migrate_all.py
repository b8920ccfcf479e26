"""Applies every service's migrations, in dependency order (the Kubernetes migration Job and
`make migrate` run this; each service also applies its own at start, under the same lock)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from touchpoint.platform.db import create_pool, migrate
from touchpoint.platform.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[4]
# ingest first: the others read its published view.
ORDER = ("ingest", "identity", "attribution", "export")


async def migrate_all(url: str) -> dict[str, list[str]]:
    pool = await create_pool(url, max_size=2)
    try:
        applied = {}
        for name in ORDER:
            folder = ROOT / "services" / name / "migrations"
            if folder.is_dir():
                applied[name] = await migrate(pool, name, folder)
        return applied
    finally:
        await pool.close()


def main() -> int:
    applied = asyncio.run(migrate_all(CommonSettings.from_env().database_url))
    for name, files in applied.items():
        print(f"{name}: {', '.join(files) if files else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
