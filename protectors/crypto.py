"""AES-256-GCM for artifacts, and loading the device key.

The key stands for what a device's secure element holds: it comes from a key file or an environment variable,
never from an artifact or a results directory. Artifacts carry a *key id* (a domain-separated SHA-256 of the key,
which reveals nothing about the key) so that a wrong key is told apart from a tampered artifact.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ArtifactError, KeyMaterialError

KEY_ENV = "EDGEPRO_BENCH_KEY"
KEY_FILE_ENV = "EDGEPRO_BENCH_KEY_FILE"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"edgepro-bench key id\x00" + key).hexdigest()[:16]


def _parse_key(raw: bytes, where: str) -> bytes:
    text = raw.strip()
    if len(raw) == KEY_BYTES:
        return bytes(raw)
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyMaterialError(f"{where}: expected a 256-bit key as 32 raw bytes or 64 hex digits")
    return key


def load_key(key_file: str | os.PathLike | None = None) -> bytes:
    """Read the device key from ``key_file``, else ``$EDGEPRO_BENCH_KEY`` (hex), else ``$EDGEPRO_BENCH_KEY_FILE``."""
    if key_file is None and os.environ.get(KEY_ENV):
        return _parse_key(os.environ[KEY_ENV].encode(), f"${KEY_ENV}")
    key_file = key_file or os.environ.get(KEY_FILE_ENV)
    if not key_file:
        raise KeyMaterialError(f"no key: pass a key file or set ${KEY_ENV} to 64 hex digits")
    path = Path(key_file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"{path}: cannot read key file ({exc.strerror})") from exc
    return _parse_key(raw, str(path))


def create_key_file(path: str | os.PathLike) -> bytes:
    """Create a fresh random key file (mode 0600) if none exists; return the key it holds."""
    path = Path(path)
    if path.exists():
        return load_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def _check_length(blob: bytes, what: str) -> None:
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ArtifactError(f"{what}: truncated ciphertext ({len(blob)} bytes)")


def _auth_failed(what: str) -> ArtifactError:
    return ArtifactError(f"{what}: authentication failed (ciphertext, nonce or metadata tampered)")


def encrypt(key: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    """Return ``nonce || ciphertext || tag`` under a fresh random 96-bit nonce."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, bytes(plaintext), aad)


def decrypt(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    """Authenticate and decrypt ``blob``; raise :class:`ArtifactError` naming ``what`` on any failure."""
    _check_length(blob, what)
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise _auth_failed(what) from None


class GcmDecryptor:
    """Decrypts one artifact blob into a buffer it owns, again and again, without new allocations.

    ``cryptography``'s one-shot ``AESGCM.decrypt`` allocates and copies; ``update_into`` on a preallocated buffer
    runs near OpenSSL's speed. The plaintext is only exposed after the tag has been checked.
    """

    def __init__(self, key: bytes, blob: bytes, aad: bytes, what: str):
        _check_length(blob, what)
        self._key = key
        self._nonce = blob[:NONCE_BYTES]
        self._tag = blob[-TAG_BYTES:]
        self._ct = memoryview(blob)[NONCE_BYTES:-TAG_BYTES]
        self._aad = aad
        self.what = what
        self.size = len(self._ct)
        # update_into needs room for one extra block.
        self.buffer = bytearray(self.size + 15)

    def decrypt(self) -> memoryview:
        """Decrypt into :attr:`buffer` and return a view of the plaintext."""
        dec = Cipher(algorithms.AES(self._key), modes.GCM(self._nonce, self._tag)).decryptor()
        dec.authenticate_additional_data(self._aad)
        n = dec.update_into(self._ct, self.buffer)
        try:
            dec.finalize()
        except InvalidTag:
            self.wipe()
            raise _auth_failed(self.what) from None
        return memoryview(self.buffer)[:n]

    def wipe(self) -> None:
        wipe_buffer(self.buffer)


def wipe_buffer(buf: bytearray) -> None:
    """Zero a buffer in place (memset), e.g. plaintext weights after a per-inference decryption."""
    ctypes.memset((ctypes.c_char * len(buf)).from_buffer(buf), 0, len(buf))
