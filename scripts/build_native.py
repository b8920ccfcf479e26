"""Compiles the identity graph's hot path with mypyc into build/native (`make native`).

mypyc turns the type-annotated module into a C extension: the same source, with its classes as
C structs and its calls direct. What it compiles is listed in MODULES; each gets a stamp with the
SHA-256 of the source it was compiled from, and the package loads the compiled module only while
that matches (services/identity/__init__.py), so a build left behind by an edit is never used.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "native"
# What services.identity.COMPILED names (main() checks).
MODULES = ["services/identity/domain.py", "services/identity/store.py", "services/identity/stitcher.py"]
# C extensions (services.identity.C_EXTENSIONS), each built from services/identity/<name>.c.
C_SOURCES = ["services/identity/_copybin.c"]


def stamp_of(source: Path) -> Path:
    rel = source.relative_to(ROOT)
    return OUT / rel.parent / f"{rel.name}.sha256"


def main() -> int:
    from services.identity import C_EXTENSIONS, COMPILED, native_is_current, source_digest

    if [f"services/identity/{m}.py" for m in COMPILED] != MODULES:
        raise SystemExit("services.identity.COMPILED and MODULES differ")
    if [f"services/identity/{m}.c" for m in C_EXTENSIONS] != C_SOURCES:
        raise SystemExit("services.identity.C_EXTENSIONS and C_SOURCES differ")
    if native_is_current():
        print("build/native is up to date")
        return 0
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").exists():
        raise SystemExit(
            f"no Python.h in {include}: compiling needs Python's headers "
            "(python.org and pyenv builds have them; on Debian/Ubuntu: apt install python3.11-dev)"
        )
    os.chdir(ROOT)  # mypyc reads pyproject.toml's [tool.mypy] and writes its C under build/
    from mypyc.build import mypycify
    from setuptools import Extension, setup

    sources = [ROOT / m for m in MODULES + C_SOURCES]
    digests = {s: source_digest(s) for s in sources}  # what is compiled, before compiling it
    for s in sources:
        stamp_of(s).unlink(missing_ok=True)
    shutil.rmtree(ROOT / "build" / "temp", ignore_errors=True)
    setup(
        name="touchpoint-native",
        packages=[],
        py_modules=[],
        ext_modules=[
            *mypycify(MODULES, opt_level="3", separate=True),
            *(
                Extension(c.removesuffix(".c").replace("/", "."), [c], extra_compile_args=["-O2"])
                for c in C_SOURCES
            ),
        ],
        script_args=[
            "-q",
            "build_ext",
            "--build-lib",
            str(OUT),
            "--build-temp",
            str(ROOT / "build" / "temp"),
        ],
    )
    for s, d in digests.items():
        stamp_of(s).write_text(d + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
