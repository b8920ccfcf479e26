"""The compiled identity hot path (scripts/build_native.py): loaded only when built from the
current sources, and what the test suite runs (`make test` builds it first)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import services.identity as pkg
from scripts.build_native import C_SOURCES, MODULES
from services.identity import domain, stitcher, store

ROOT = Path(__file__).resolve().parents[1]


def _fake_build(native: Path, sources: Path) -> None:
    for name, source in [(m, f"{m}.py") for m in pkg.COMPILED] + [(c, f"{c}.c") for c in pkg.C_EXTENSIONS]:
        (sources / source).write_text(f"# {name}\n")
        digest = hashlib.sha256((sources / source).read_bytes()).hexdigest()
        (native / f"{source}.sha256").write_text(digest + "\n")
        (native / f"{name}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")


def test_modules_compiled_are_the_ones_the_package_checks() -> None:
    assert [f"services/identity/{m}.py" for m in pkg.COMPILED] == MODULES
    assert [f"services/identity/{m}.c" for m in pkg.C_EXTENSIONS] == C_SOURCES


def test_a_build_is_used_only_while_every_source_is_unchanged(tmp_path: Path) -> None:
    native, sources = tmp_path / "native", tmp_path / "src"
    native.mkdir()
    sources.mkdir()
    assert not pkg.native_is_current(native, sources)  # nothing built
    _fake_build(native, sources)
    assert pkg.native_is_current(native, sources)
    (sources / "store.py").write_text("# store, edited after the build\n")
    assert not pkg.native_is_current(native, sources)
    _fake_build(native, sources)
    (native / "domain.cpython-311-x86_64-linux-gnu.so").unlink()
    assert not pkg.native_is_current(native, sources)
    _fake_build(native, sources)
    (native / "stitcher.py.sha256").unlink()
    assert not pkg.native_is_current(native, sources)
    _fake_build(native, sources)
    (sources / "_copybin.c").write_text("/* the C encoder, edited after the build */\n")
    assert not pkg.native_is_current(native, sources)


def test_the_suite_runs_the_compiled_modules() -> None:
    # `make test` builds build/native before pytest: the tests exercise what production runs.
    assert pkg.native_is_current(), "build/native is missing or stale: run `make native`"
    if os.environ.get("TOUCHPOINT_NATIVE", "1") != "0":
        assert pkg.NATIVE
        assert store._COPYBIN is not None  # the C encoder of COPY rows, built with them
        for module in (domain, store, stitcher):
            assert module.__file__ is not None
            assert Path(module.__file__).parent == pkg.NATIVE_DIR, module.__file__
            assert module.__file__.endswith(".so")


def test_native_off_loads_the_sources() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import services.identity.domain as d, services.identity as p; print(p.NATIVE, d.__file__)",
        ],
        env={**os.environ, "TOUCHPOINT_NATIVE": "0"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["False", str(ROOT / "services" / "identity" / "domain.py")]
