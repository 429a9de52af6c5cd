"""The on-disk artifact: what a protector deploys to the device, and all a thief can copy.

An artifact is a directory of plain files, no pickle anywhere. ``meta.json`` holds the format version, a random
*artifact id*, the protector's name and public parameters, the model spec, the key id, and a manifest of every
other file: its SHA-256 and an HMAC-SHA256 (under a sub-key of the device key) over the artifact id, the file's
name and its hash. The whole metadata carries one more HMAC. Encrypted files (``secret_files``) are AES-256-GCM
with the artifact id and the file's name as associated data.

What this gives, and to whom:

- *Anyone* (the thief included) detects random damage: the metadata's and every file's SHA-256 are checked when
  the artifact is read.
- *The key holder* (every authorized load path) detects any deliberate change: a file swapped in from another
  artifact (the artifact id differs), a file renamed or replayed in place of another (the name is in the MAC), a
  file rewritten together with its hash, added or removed files, and rewritten metadata. The error names the file.
- Not covered: rolling back the *whole* directory to an older, genuine artifact under the same key (no counter).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_dir
from .crypto import GcmDecryptor, decrypt, encrypt, key_id, mac, mac_equal
from .errors import ArtifactError, KeyMaterialError
from .hashing import canonical_json, sha256_hex

FORMAT = "edgepro-bench-artifact/2"
META = "meta.json"
#: manifest keys in ``meta.json`` that the harness and the format own (protectors put their own keys beside them)
RESERVED = ("format", "artifact_id", "protector", "params", "model", "key_id", "files", "secret_files", "checksum",
            "mac")


@dataclass
class Artifact:
    """A protected model: metadata plus named files (bytes), with an optional directory it was read from.

    Build one with :meth:`new`, add files with :meth:`put` (plaintext) and :meth:`put_encrypted`, and
    :meth:`seal` it with the key before saving. Read one with :meth:`load`; check it with :meth:`verify` (key
    holder) or :meth:`check_integrity` (anyone).
    """

    meta: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    path: Path | None = None
    _verified: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def new(cls, protector: str, params: dict[str, Any], model_spec: dict[str, Any], key: bytes,
            **extra: Any) -> Artifact:
        bad = [k for k in extra if k in RESERVED]
        if bad:
            raise ValueError(f"artifact metadata key {bad[0]!r} is reserved")
        meta = {"format": FORMAT, "artifact_id": secrets.token_hex(16), "protector": protector, "params": params,
                "model": model_spec, "key_id": key_id(key), "files": {}, "secret_files": [], **extra}
        return cls(meta)

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"<{self.meta.get('protector', '?')} artifact>"

    @property
    def artifact_id(self) -> str:
        return str(self.meta.get("artifact_id", ""))

    def file(self, name: str) -> bytes:
        try:
            return self.files[name]
        except KeyError:
            raise ArtifactError(f"{self.where}: missing file {name}") from None

    def put(self, name: str, data: bytes) -> None:
        """Add or replace a plaintext file (the artifact must be sealed again before use)."""
        if "/" in name or name.startswith(".") or name == META:
            raise ValueError(f"bad artifact file name {name!r}")
        self.files[name] = bytes(data)
        self._verified = None

    def aad(self, name: str) -> bytes:
        """Associated data binding an encrypted file to this artifact and to its own name."""
        return canonical_json({"format": FORMAT, "artifact_id": self.artifact_id, "file": name})

    def put_encrypted(self, name: str, plaintext: bytes | memoryview, key: bytes) -> None:
        """Add a file encrypted with AES-256-GCM under the key, bound to this artifact and name."""
        self.put(name, encrypt(key, plaintext, self.aad(name)))
        if name not in self.meta["secret_files"]:
            self.meta["secret_files"].append(name)

    def decrypt(self, name: str, key: bytes) -> bytes:
        return decrypt(key, self.file(name), self.aad(name), f"{self.where}/{name}")

    def decryptor(self, name: str, key: bytes) -> GcmDecryptor:
        return GcmDecryptor(key, self.file(name), self.aad(name), f"{self.where}/{name}")

    @property
    def secret_files(self) -> list[str]:
        return list(self.meta.get("secret_files", []))

    @property
    def secret_bytes(self) -> int:
        """Bytes under encryption (what must be decrypted with the key)."""
        return sum(len(self.files.get(n, b"")) for n in self.secret_files)

    # -- authentication ------------------------------------------------------------------------------------------
    def _file_mac(self, key: bytes, name: str, digest: str) -> str:
        return mac(key, canonical_json([FORMAT, self.artifact_id, name, digest]))

    def _meta_mac(self, key: bytes) -> str:
        return mac(key, canonical_json({k: v for k, v in self.meta.items() if k not in ("mac", "checksum")}))

    def _checksum(self) -> str:
        """An unkeyed hash of the metadata, the MAC included: damage to any byte of it shows without the key."""
        return sha256_hex(canonical_json({k: v for k, v in self.meta.items() if k != "checksum"}))

    def seal(self, key: bytes) -> Artifact:
        """Record every file's hash and MAC and the metadata's MAC under ``key`` (after the last :meth:`put`)."""
        if self.meta.get("key_id") != key_id(key):
            raise KeyMaterialError(f"{self.where}: sealing with another key than the one it was made with")
        self.meta["files"] = {n: {"sha256": (d := sha256_hex(b)), "mac": self._file_mac(key, n, d)}
                              for n, b in sorted(self.files.items())}
        self.meta["mac"] = self._meta_mac(key)
        self.meta["checksum"] = self._checksum()
        self._verified = self._state(key)
        return self

    def _state(self, key: bytes) -> tuple:
        """What a verification holds for: the key, the metadata, and the very file objects (bytes are immutable)."""
        return key_id(key), canonical_json(self.meta), tuple((n, id(b)) for n, b in sorted(self.files.items()))

    def check_key(self, key: bytes) -> None:
        """Tell a wrong key apart from tampering, by the key id recorded in the metadata."""
        expected = self.meta.get("key_id")
        if expected != key_id(key):
            raise KeyMaterialError(f"{self.where}: wrong key (key id {key_id(key)}, artifact needs {expected})")

    def check_integrity(self) -> None:
        """Metadata and every file undamaged: no file missing or unlisted, each matching its recorded SHA-256.

        Anyone can run this check (no key): it catches damage, not an attacker, who can fix up the hashes."""
        if self.meta.get("checksum") != self._checksum():
            raise ArtifactError(f"{self.where}/{META}: checksum mismatch, the metadata was damaged or edited")
        listed = self.meta.get("files")
        if not isinstance(listed, dict):
            raise ArtifactError(f"{self.where}/{META}: no file manifest")
        for name in self.files:
            if name not in listed:
                raise ArtifactError(f"{self.where}/{name}: not in the artifact's manifest")
        for name, entry in listed.items():
            if not isinstance(entry, dict) or sha256_hex(self.file(name)) != entry.get("sha256"):
                raise ArtifactError(f"{self.where}/{name}: SHA-256 mismatch, the file was damaged or replaced")

    def verify(self, key: bytes) -> None:
        """Authenticate every file and the metadata under ``key``; the error names the first file that fails."""
        state = self._state(key)
        if self._verified == state:
            return
        self.check_key(key)
        self.check_integrity()
        for name, entry in self.meta["files"].items():
            if not mac_equal(str(entry.get("mac", "")), self._file_mac(key, name, entry["sha256"])):
                raise ArtifactError(f"{self.where}/{name}: not authenticated by the key (replaced, swapped in from "
                                    f"another artifact, or renamed)")
        if not mac_equal(str(self.meta.get("mac", "")), self._meta_mac(key)):
            raise ArtifactError(f"{self.where}/{META}: metadata not authenticated by the key (rewritten)")
        self._verified = state

    # -- files -----------------------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return len(canonical_json(self.meta)) + sum(len(b) for b in self.files.values())

    def save(self, path: str | os.PathLike) -> Path:
        if "mac" not in self.meta:
            raise ValueError("artifact not sealed: call seal(key) before save()")
        path = Path(path)
        files = dict(self.files)
        files[META] = json.dumps(self.meta, indent=1, sort_keys=True).encode()
        atomic_write_dir(path, files)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        """Read an artifact directory and check every file's SHA-256 (not yet authenticated: see :meth:`verify`)."""
        path = Path(path)
        meta_path = path / META
        try:
            meta = json.loads(meta_path.read_bytes())
        except FileNotFoundError:
            raise ArtifactError(f"{meta_path}: not found (is {path} an artifact directory?)") from None
        except NotADirectoryError:
            raise ArtifactError(f"{path}: not an artifact directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{meta_path}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
            raise ArtifactError(f"{meta_path}: not an edgepro-bench artifact")
        if meta["format"] != FORMAT:
            raise ArtifactError(f"{meta_path}: artifact format {meta['format']!r} is not supported (this version "
                                f"reads {FORMAT!r}); protect the model again")
        listed = meta.get("files")
        if not isinstance(listed, dict) or not isinstance(meta.get("secret_files", []), list):
            raise ArtifactError(f"{meta_path}: malformed file manifest")
        files = {}
        for name in listed:
            if not isinstance(name, str) or "/" in name or name.startswith(".") or name == META:
                raise ArtifactError(f"{meta_path}: bad file name {name!r}")
            try:
                files[name] = (path / name).read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                raise ArtifactError(f"{path / name}: missing from the artifact") from None
        extra = sorted(p.name for p in path.iterdir() if p.name != META and p.name not in listed
                       and not p.name.startswith("."))
        if extra:
            raise ArtifactError(f"{path / extra[0]}: not in the artifact's manifest")
        artifact = cls(meta=meta, files=files, path=path)
        artifact.check_integrity()
        return artifact
