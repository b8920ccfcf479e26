"""The identity service: stitches identifiers into profiles (gRPC 50052, metrics 9102).

The graph's hot path (`domain`, `store`, `stitcher`) is loaded compiled (mypyc: `make native` builds it into
build/native, with the C encoder of COPY rows, `_copybin.c`) when that build was made from the current sources, and from the sources otherwise
or when TOUCHPOINT_NATIVE=0: the same code either way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent
NATIVE_DIR = _HERE.parents[1] / "build" / "native" / "services" / "identity"
# What scripts/build_native.py compiles, each stamped with the SHA-256 of its source: these
# modules with mypyc, and C extensions written as such (_copybin: COPY rows in Postgres' binary
# format, which store.py uses when it is built).
COMPILED = ("domain", "store", "stitcher")
C_EXTENSIONS = ("_copybin",)


def source_digest(source: Path) -> str:
    """What a compiled module's stamp holds: the SHA-256 of the source it was compiled from."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def native_is_current(native: Path = NATIVE_DIR, sources: Path = _HERE) -> bool:
    """Whether `native` holds every compiled module, each stamped with its current source's
    SHA-256: after an edit, until the next build, every module is loaded from its source."""
    try:
        for name, source in [(m, f"{m}.py") for m in COMPILED] + [(c, f"{c}.c") for c in C_EXTENSIONS]:
            built = (native / f"{source}.sha256").read_text().strip()
            if built != source_digest(sources / source):
                return False
            if not any(native.glob(f"{name}.*.so")):
                return False
    except OSError:
        return False
    return True


NATIVE = os.environ.get("TOUCHPOINT_NATIVE", "1") != "0" and native_is_current()
if NATIVE:
    __path__.insert(0, str(NATIVE_DIR))
