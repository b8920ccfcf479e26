"""Shared bench plumbing: a Postgres, service subprocesses on free ports, latency figures."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from touchpoint.platform.embedded import start_embedded
from touchpoint.platform.testing import free_port

__all__ = ["free_port"]

ROOT = Path(__file__).resolve().parents[1]


def bench_postgres() -> tuple[str, object]:
    """TOUCHPOINT_BENCH_DATABASE_URL, else a fresh embedded server (deleted at exit)."""
    url = os.environ.get("TOUCHPOINT_BENCH_DATABASE_URL")
    if url:
        return url, None
    return start_embedded(Path(tempfile.mkdtemp(prefix="tp-bench-")) / "data", delete_on_exit=True)


def start_service(name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python -m services.<name>` as its own process, as in production."""
    full = dict(os.environ, TOUCHPOINT_LOG_LEVEL="WARNING", **env)
    return subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=full)


def wait_grpc(address: str, timeout: float = 30.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            with grpc.insecure_channel(address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{address} did not become healthy")
        time.sleep(0.1)


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def cpu_seconds(pids: Sequence[int]) -> dict[str, float]:
    """CPU seconds used so far by the given processes and, for a postgres postmaster among
    them, all its backends (to show where a phase's CPU went)."""
    import psutil

    out: dict[str, float] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
            name = " ".join(proc.cmdline()[-2:]) if proc.name() == "python" else proc.name()
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            out[name] = out.get(name, 0.0) + total
        except psutil.NoSuchProcess:
            pass
    return out


def postmaster_pid(url_or_handle: object) -> int | None:
    """The pid of the embedded postmaster, when the bench started one."""
    get = getattr(url_or_handle, "get_pid", None)
    return int(get()) if get is not None else None
