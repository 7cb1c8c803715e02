"""Per-unit result cache shared by the benchmark scripts: one JSON file {"results": {key: row}},
rewritten atomically after every unit so an interrupted run resumes where it stopped (no JAX
import here: the scripts time their units from a cold start)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_results(path: Path) -> dict:
    """The cached rows by unit key ({} before the first unit)."""
    return json.loads(path.read_text())["results"] if path.exists() else {}


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_result(path: Path, key: str, row: dict) -> dict:
    """Add one unit's row to the cache; returns every cached row."""
    results = read_results(path)
    results[key] = row
    write_atomic(path, json.dumps({"results": results}, indent=1, sort_keys=True))
    return results
