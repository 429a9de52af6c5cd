"""Provenance stamped on every record: code version, packages, machine, threads."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from protectors.core.crypto import KEY_ENV

PACKAGES = ("torch", "torchvision", "numpy", "cryptography", "safetensors", "torch-pruning", "onnxruntime",
            "scikit-learn", "edgepro-bench")


def _git(*args: str, cwd: str | Path | None = None) -> str | None:
    """``git ARGS`` in ``cwd`` (default: this package's checkout): its stdout, or None when git or the checkout is
    not there. The child gets no device key in its environment (see :func:`protectors.core.crypto.take_env_key`)."""
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    try:
        out = subprocess.run(["git", *args], cwd=cwd or Path(__file__).parent, capture_output=True, text=True,
                             timeout=5, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def repo_root(cwd: str | Path | None = None) -> Path | None:
    """The top of the git checkout holding this package (or ``cwd``), or None outside one."""
    top = _git("rev-parse", "--show-toplevel", cwd=cwd)
    return Path(top.strip()) if top and top.strip() else None


def git_dirty(cwd: str | Path | None = None) -> list[str] | None:
    """The tracked files with uncommitted changes (``git status --porcelain``, untracked files left out): an empty
    list for a clean tree, None when there is no git checkout to ask."""
    out = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return None if out is None else [line[3:] for line in out.splitlines() if line.strip()]


@functools.cache
def git_commit() -> str | None:
    out = _git("rev-parse", "HEAD")
    if out is None:
        return None
    return out.strip() + ("-dirty" if git_dirty() else "")


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def plugins() -> dict[str, dict]:
    """Every loaded protector, attack and target: its module, distribution, version and code digest."""
    from attacks import attacks
    from protectors import protectors
    from protectors.core.identity import plugin_identity

    from .targets import targets

    out = {}
    for registry in (protectors, attacks, targets):
        for name, obj in registry.loaded().items():
            out[f"{registry.kind}:{name}"] = plugin_identity(obj)
    return out


def provenance(seed: int | None = None) -> dict:
    return {"git_commit": git_commit(), "python": platform.python_version(), "packages": versions(),
            "plugins": plugins(), "cpu": cpu_model(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "seed": seed}
