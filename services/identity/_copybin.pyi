# services/identity/_copybin.c (built by `make native`).
from typing import Any

def encode(rows: list[tuple[Any, ...]], types: str) -> bytes: ...
