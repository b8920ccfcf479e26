"""Several worker processes behind one port, for the services whose per-event Python work needs
more than one core (ingest, the gateway).

The supervisor starts N copies of the service with SO_REUSEPORT (the kernel spreads incoming
connections over them), serves the Prometheus /metrics of all of them from one port through
prometheus_client's multiprocess mode, forwards SIGTERM/SIGINT so every worker drains, and
stops the others when one dies (the orchestrator restarts the whole pod/process).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

WORKER_ENV = "TOUCHPOINT_WORKER_INDEX"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def supervise(module: str, workers: int, metrics_port: int | None) -> int:
    """Runs `python -m <module>` `workers` times as workers; returns the exit code."""
    own_dir = MULTIPROC_ENV not in os.environ
    metrics_dir = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="tp-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    # Imported only now: the multiprocess collector reads the directory set above.
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    procs = [
        subprocess.Popen([sys.executable, "-m", module], env=dict(os.environ, **{WORKER_ENV: str(i)}))
        for i in range(workers)
    ]
    if metrics_port is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(metrics_port, registry=registry)

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    while not stopping:
        if any(p.poll() is not None for p in procs):
            code = 1
            on_signal(signal.SIGTERM, None)
            break
        time.sleep(0.2)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
    if own_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code
