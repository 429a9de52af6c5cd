"""Cache of trained models and protected artifacts, keyed by the hash of everything that determines them.

Files are safetensors and artifact directories (never pickle). A second run with the same config retrains nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from protectors.artifact import META, Artifact
from protectors.atomic import atomic_write_bytes
from protectors.errors import ArtifactError
from protectors.hashing import config_hash
from protectors.weights import load_state_bytes, state_bytes

CACHE_VERSION = 2  # bump when what is cached changes format (v2: secret parameters out of meta.json)


class Cache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _hash(self, key: dict[str, Any]) -> str:
        return config_hash({"v": CACHE_VERSION, **key})

    def model(self, key: dict[str, Any], build: Callable[[], nn.Module],
              train: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """The model trained as ``train(build())``, from the cache when this key was trained before."""
        path = self.root / "models" / f"{self._hash(key)}.safetensors"
        if path.exists():
            try:
                return load_state_bytes(build(), path.read_bytes(), str(path)).eval()
            except ArtifactError:
                path.unlink(missing_ok=True)  # a damaged cache entry is retrained, not trusted
        model = train(build())
        atomic_write_bytes(path, state_bytes(model))
        return model.eval()

    def _artifact_path(self, key: dict[str, Any]) -> Path:
        return self.root / "artifacts" / self._hash(key)

    def artifact_dir(self, key: dict[str, Any], make: Callable[[], Artifact]) -> Path:
        """The directory of the artifact ``make()`` builds, built and saved only when missing (not read here)."""
        path = self._artifact_path(key)
        if not (path / META).exists():
            make().save(path)
        return path

    def artifact(self, key: dict[str, Any], make: Callable[[], Artifact]) -> Artifact:
        path = self._artifact_path(key)
        if path.exists():
            try:
                return Artifact.load(path)
            except ArtifactError:
                pass
        artifact = make()
        artifact.save(path)
        return artifact
