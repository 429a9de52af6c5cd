"""The on-disk artifact: what a protector deploys to the device, and all a thief can copy.

An artifact is a directory of plain files, no pickle anywhere:

- ``meta.json`` — format version, protector name and parameters, model spec, and the SHA-256 of every other file
  except encrypted blobs (whose integrity AES-GCM checks, with the metadata bound as associated data);
- ``weights.safetensors`` — plaintext weights (``none``, ``edgepro``);
- ``model.enc`` — ``nonce || AES-256-GCM(weights.safetensors) || tag`` (``aes``);
- ``password.enc`` — ``nonce || AES-256-GCM(password JSON) || tag`` (``edgepro``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_dir
from .errors import ArtifactError
from .hashing import canonical_json, sha256_hex

FORMAT = "edgepro-bench-artifact/1"
META = "meta.json"
DEPLOY_FILES = "deploy_files"


@dataclass
class Artifact:
    """A protected model: metadata plus named files (bytes), with an optional directory it was read from."""

    meta: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    path: Path | None = None

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"<{self.meta.get('protector', '?')} artifact>"

    def file(self, name: str) -> bytes:
        try:
            return self.files[name]
        except KeyError:
            raise ArtifactError(f"{self.where}: missing file {name}") from None

    def aad(self) -> bytes:
        """Associated data for encrypted blobs: the canonical metadata (less ``deploy_files``, added later)."""
        return canonical_json({k: v for k, v in self.meta.items() if k != DEPLOY_FILES})

    def add_deploy_files(self, files: dict[str, bytes]) -> None:
        """Add runtime-specific files (e.g. ONNX graphs) after protection, each checked by its SHA-256 at load."""
        self.files.update(files)
        self.meta.setdefault(DEPLOY_FILES, {}).update({n: sha256_hex(b) for n, b in files.items()})

    @property
    def total_bytes(self) -> int:
        return len(canonical_json(self.meta)) + sum(len(b) for b in self.files.values())

    def check_hashes(self) -> None:
        """Verify the plaintext files against the hashes recorded in the metadata."""
        for name, digest in self.meta.get("sha256", {}).items():
            if sha256_hex(self.file(name)) != digest:
                raise ArtifactError(f"{self.where}/{name}: SHA-256 mismatch, the file was tampered with or swapped")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        files = dict(self.files)
        files[META] = json.dumps(self.meta, indent=1, sort_keys=True).encode()
        atomic_write_dir(path, files)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        path = Path(path)
        meta_path = path / META
        try:
            meta = json.loads(meta_path.read_bytes())
        except FileNotFoundError:
            raise ArtifactError(f"{meta_path}: not found (is {path} an artifact directory?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{meta_path}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ArtifactError(f"{meta_path}: not an {FORMAT} artifact")
        files = {}
        deploy = meta.get(DEPLOY_FILES, {})
        for name in list(meta.get("files", [])) + list(deploy):
            if "/" in name or name.startswith("."):
                raise ArtifactError(f"{meta_path}: bad file name {name!r}")
            try:
                files[name] = (path / name).read_bytes()
            except FileNotFoundError:
                raise ArtifactError(f"{path / name}: missing from the artifact") from None
            if name in deploy and sha256_hex(files[name]) != deploy[name]:
                raise ArtifactError(f"{path / name}: SHA-256 mismatch, the file was tampered with or swapped")
        return cls(meta=meta, files=files, path=path)


def new_meta(protector: str, params: dict[str, Any], model_spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "protector": protector, "params": params, "model": model_spec, **extra}
