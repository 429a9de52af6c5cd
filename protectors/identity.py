"""A plugin's identity: where its code comes from and a digest of that code, for cache keys and provenance.

Editing a protector's or an attack's code changes its digest, so the cells that depend on it are recomputed instead
of being served from old records.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


@functools.cache
def _distribution(top_module: str) -> tuple[str, str] | None:
    names = metadata.packages_distributions().get(top_module) or []
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _source_files(cls: type) -> list[Path]:
    """The plugin's own module file, and every file of its package when it lives outside this repository."""
    module = sys.modules.get(cls.__module__)
    path = Path(inspect.getsourcefile(cls) or getattr(module, "__file__", "") or "")
    top = cls.__module__.split(".")[0]
    if top not in ("protectors", "attacks", "bench") and path.parent.joinpath("__init__.py").exists():
        return sorted(path.parent.rglob("*.py"))
    return [path] if path.is_file() else []


@functools.cache
def plugin_identity(cls: type) -> dict[str, Any]:
    """``{"module", "distribution", "version", "code"}`` of a plugin class (``code``: SHA-256 of its sources)."""
    h = hashlib.sha256()
    for f in _source_files(cls):
        h.update(f.name.encode() + b"\x00" + f.read_bytes())
    dist = _distribution(cls.__module__.split(".")[0])
    return {"module": cls.__module__, "distribution": dist[0] if dist else None,
            "version": dist[1] if dist else None, "code": h.hexdigest()[:16]}
