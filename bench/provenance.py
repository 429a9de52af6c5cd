"""Provenance stamped on every record: code version, packages, machine, threads."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "torchvision", "numpy", "cryptography", "safetensors", "torch-pruning", "onnxruntime",
            "scikit-learn", "edgepro-bench")


@functools.cache
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


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
