"""Cache of trained models and protected artifacts, keyed by the hash of everything that determines them.

Files are safetensors and artifact directories (never pickle). A second run with the same config retrains nothing.

The cache heals itself: a model file carries the SHA-256 of its tensors, an artifact is authenticated under the
device key, and an entry that fails its check is reported once (a :class:`CacheWarning`) and rebuilt. Several
processes, on one machine or many sharing a file system, may use one cache: every write is atomic, and each entry
is built under an exclusive per-entry file lock, so it is built once while the others wait and then read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from protectors.core.artifact import Artifact
from protectors.core.atomic import atomic_write_bytes
from protectors.core.errors import BenchError
from protectors.core.hashing import config_hash

#: bump when what is cached changes format (v4: artifacts name their cell; code digests of the training loop in keys)
CACHE_VERSION = 4


class CacheWarning(UserWarning):
    """A damaged cache entry, rebuilt."""


class DamagedEntry(Exception):
    pass


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode() + b"\x00" + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_bytes(model: nn.Module) -> bytes:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return st_save(state, metadata={"sha256": _tensor_digest(state)})


def load_model_bytes(model: nn.Module, data: bytes) -> nn.Module:
    try:
        state = st_load(data)
        digest = _read_metadata(data).get("sha256")
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DamagedEntry(f"unreadable ({str(exc)[:80]})") from None
    if digest != _tensor_digest(state):
        raise DamagedEntry("tensor checksum mismatch")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise DamagedEntry("weights do not fit the model") from None
    return model


def _read_entry(path: Path) -> bytes:
    """A cache file's bytes; anything that is not a readable regular file is a damaged entry."""
    if not path.is_file():
        raise DamagedEntry("not a regular file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DamagedEntry(f"unreadable ({exc.strerror or exc})") from None


def _read_metadata(data: bytes) -> dict:
    import json

    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}


class Cache:
    def __init__(self, root: str | Path, key: bytes):
        self.root = Path(root)
        self.key = key

    def _hash(self, key: dict[str, Any]) -> str:
        return config_hash({"v": CACHE_VERSION, **key})

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        """An exclusive lock for building the entry at ``path`` (other processes wait, then find it built)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _damaged(path: Path, why: str) -> None:
        warnings.warn(f"{path}: damaged cache entry ({why}); rebuilding it", CacheWarning, stacklevel=3)

    def model(self, key: dict[str, Any], build: Callable[[], nn.Module],
              train: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """The model trained as ``train(build())``, from the cache when this key was trained before."""
        path = self.root / "models" / f"{self._hash(key)}.safetensors"
        with self._locked(path):
            if path.exists():
                try:
                    return load_model_bytes(build(), _read_entry(path)).eval()
                except DamagedEntry as exc:
                    self._damaged(path, str(exc))
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)  # the rebuilt file takes its place
            model = train(build())
            atomic_write_bytes(path, model_bytes(model))
        return model.eval()

    def _read_artifact(self, path: Path, cell: str) -> Artifact | None:
        if not path.exists():
            return None
        try:
            artifact = Artifact.load(path)
            artifact.verify(self.key)
        except BenchError as exc:
            self._damaged(path, str(exc).removeprefix(f"{path}").lstrip("/: ")[:160])
            return None
        if artifact.meta.get("cell") != cell:
            self._damaged(path, f"a genuine artifact, but built for cell {artifact.meta.get('cell')!r}, not {cell!r}")
            return None
        return artifact

    def artifact(self, key: dict[str, Any], make: Callable[[], Artifact]) -> Artifact:
        """The artifact ``make()`` builds (sealed with the cache's key), from the cache when it is there, authentic
        and built for this very cell.

        The cell's hash goes into the artifact's authenticated metadata (``cell``), so a directory replaced by another
        genuine artifact under the same key (an older build, or another cell's) is refused and rebuilt."""
        cell = self._hash(key)
        path = self.root / "artifacts" / cell
        with self._locked(path):
            artifact = self._read_artifact(path, cell)
            if artifact is None:
                artifact = make()
                artifact.meta["cell"] = cell
                artifact.seal(self.key)
                artifact.save(path)
        return artifact

    def artifact_dir(self, key: dict[str, Any], make: Callable[[], Artifact]) -> Path:
        """The directory of that artifact (for a child process to read)."""
        self.artifact(key, make)
        return self.root / "artifacts" / self._hash(key)
