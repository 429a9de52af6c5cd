"""A plugin's identity: where its code comes from and a digest of that code, for cache keys and provenance.

The digest covers the *closure* of the plugin's imports inside the suite's repository (and inside its own package,
for a plugin installed from elsewhere): editing any module a plugin's code reaches, the shared core included,
changes its digest, so the cells that depend on it are recomputed instead of being served from old records. A name
imported from a package's ``__init__`` is followed to the module that defines it, so a plugin that writes
``from protectors import Artifact`` depends on ``protectors/core/artifact.py``, not on every built-in.

A plugin may also declare ``version`` (a string, class attribute): bump it to recompute its cells when what changes
is outside the code (a data file, a bug fixed in a dependency).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

#: the repository root holding ``protectors/``, ``attacks/`` and ``bench/``
REPO_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _distribution(top_module: str) -> tuple[str, str] | None:
    names = metadata.packages_distributions().get(top_module) or []
    for name in names:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _module_file(name: str) -> Path | None:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None) if module is not None else None
    if file is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        file = spec.origin if spec is not None else None
    if not file or not str(file).endswith(".py"):
        return None
    return Path(file).resolve()


def _is_module(name: str) -> bool:
    if name in sys.modules:
        return isinstance(sys.modules[name], ModuleType)
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _imports(module: str, path: Path) -> set[str]:
    """The modules ``module`` imports anywhere in its source (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if alias.name != "*" and _is_module(full):
                    out.add(full)
                    continue
                # A name re-exported by a package: follow it to the module that defines it.
                try:
                    obj = getattr(importlib.import_module(base), alias.name)
                    owner = getattr(obj, "__module__", None) if (inspect.isclass(obj) or callable(obj)) else None
                except (ImportError, AttributeError, ValueError):
                    owner = None
                out.add(owner if owner and _is_module(owner) else base)
    return out


def _within(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(r) for r in roots)


def closure(modules: list[str], extra_roots: tuple[Path, ...] = ()) -> dict[str, Path]:
    """Every module reachable by imports from ``modules`` whose file lies in this repository (or ``extra_roots``),
    name → file."""
    roots = (REPO_ROOT / "protectors", REPO_ROOT / "attacks", REPO_ROOT / "bench", *extra_roots)
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None or not _within(path, roots):
            continue
        seen[name] = path
        todo.extend(_imports(name, path) - seen.keys())
    return seen


def digest(files: dict[str, Path]) -> str:
    """SHA-256 (16 hex digits) of the modules' names and sources, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\x00" + files[name].read_bytes() + b"\x00")
    return h.hexdigest()[:16]


@functools.cache
def code_digest(*modules: str) -> str:
    """The digest of the in-repo code ``modules`` depend on (e.g. the harness's training loop, for trained models)."""
    return digest(closure(list(modules)))


@functools.cache
def plugin_identity(cls: type) -> dict[str, Any]:
    """``{"module", "distribution", "version", "code"}`` of a plugin class (``code``: SHA-256 of the sources of the
    closure of its in-repo imports, and of the plugin's declared ``version``)."""
    top = cls.__module__.split(".")[0]
    extra: tuple[Path, ...] = ()
    own = _module_file(top)
    if own is not None and top not in ("protectors", "attacks", "bench"):  # a plugin package of its own
        extra = (own.parent,) if own.name == "__init__.py" else (own,)
    files = closure([cls.__module__], extra)
    declared = getattr(cls, "version", None)
    code = digest(files)
    if declared is not None:
        code = hashlib.sha256(f"{code}:{declared}".encode()).hexdigest()[:16]
    dist = _distribution(top)
    return {"module": cls.__module__, "distribution": dist[0] if dist else None,
            "version": dist[1] if dist else None, "code": code,
            **({"declared_version": str(declared)} if declared is not None else {})}
