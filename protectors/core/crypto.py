"""AES-256-GCM and HMAC for artifacts, sub-keys derived from the device key, and strict key loading.

The key stands for what a device's secure element holds: it comes from a key file or an environment variable,
never from an artifact or a results directory. Nothing uses the device key directly: every purpose gets its own
sub-key by HKDF-SHA256 (:func:`derive`), so the encryption key, the artifact MAC key and the seeds of secret draws
are independent. Artifacts carry a *key id* (a domain-separated SHA-256 of the key, which reveals nothing about
it) so that a wrong key is told apart from a tampered artifact.

Key input is strict: a key given in any form that does not parse is an error, never a fallback to another key;
hex and raw keys are told apart by an explicit format (``hex`` by default), never by length; weak keys (one byte
repeated, e.g. all zeros) are refused; a key file readable by group or others gives a warning; a key file that
is not a regular file (a named pipe, a device) is refused rather than read, so a FIFO with no writer cannot hang a
run.

A key given in ``$EDGEPRO_BENCH_KEY`` is read once into this process's memory and removed from ``os.environ``
(:func:`take_env_key`), so that no child process (Dask workers, the multiprocessing resource tracker, ``git``)
inherits it.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import secrets
import stat
import warnings
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ArtifactError, KeyMaterialError

KEY_ENV = "EDGEPRO_BENCH_KEY"
KEY_FILE_ENV = "EDGEPRO_BENCH_KEY_FILE"
KEY_FORMAT_ENV = "EDGEPRO_BENCH_KEY_FORMAT"
KEY_FORMATS = ("hex", "raw")
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


class KeyFileWarning(UserWarning):
    """A key file that others can read."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"edgepro-bench key id\x00" + key).hexdigest()[:16]


def derive(key: bytes, purpose: str, context: bytes = b"", length: int = KEY_BYTES) -> bytes:
    """A sub-key for one ``purpose`` (and ``context``), independent of every other sub-key (HKDF-SHA256)."""
    info = b"edgepro-bench/" + purpose.encode() + b"\x00" + context
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def secret_seed(key: bytes, context: bytes) -> int:
    """A 128-bit seed for secret draws (e.g. EdgePro's password), reproducible only for whoever holds the key."""
    return int.from_bytes(derive(key, "secret-rng", context, 16), "big")


def mac(key: bytes, data: bytes) -> str:
    """HMAC-SHA256 of ``data`` under the artifact MAC sub-key, hex."""
    return hmac.new(derive(key, "artifact-mac"), data, hashlib.sha256).hexdigest()


def mac_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def parse_key(raw: bytes, where: str, fmt: str = "hex") -> bytes:
    """The 256-bit key in ``raw`` read as ``fmt`` (``hex``: 64 hex digits, surrounding whitespace allowed;
    ``raw``: exactly 32 bytes). Anything else, and weak keys, raise :class:`KeyMaterialError` naming ``where``."""
    if fmt not in KEY_FORMATS:
        raise KeyMaterialError(f"{where}: unknown key format {fmt!r} (allowed: {', '.join(KEY_FORMATS)})")
    if fmt == "raw":
        if len(raw) != KEY_BYTES:
            raise KeyMaterialError(f"{where}: a raw key must be exactly {KEY_BYTES} bytes, got {len(raw)}")
        key = bytes(raw)
    else:
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise KeyMaterialError(f"{where}: not a hex key (non-ASCII bytes; for a binary key use key format "
                                   f"'raw')") from None
        if not text:
            raise KeyMaterialError(f"{where}: empty key")
        if any(c not in "0123456789abcdefABCDEF" for c in text):
            raise KeyMaterialError(f"{where}: not a hex key (expected {2 * KEY_BYTES} hex digits)")
        if len(text) != 2 * KEY_BYTES:
            raise KeyMaterialError(f"{where}: expected a 256-bit key as {2 * KEY_BYTES} hex digits, got "
                                   f"{len(text)} ({len(text) * 4} bits)")
        key = bytes.fromhex(text)
    if len(set(key)) == 1:
        raise KeyMaterialError(f"{where}: weak key refused (every byte is 0x{key[0]:02x})")
    return key


def _warn_if_readable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(f"{path}: key file is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                      f"chmod 600 it", KeyFileWarning, stacklevel=3)


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def read_key_file(path: str | os.PathLike, fmt: str = "hex") -> bytes:
    """The key in the regular file ``path``. Anything else (a named pipe, a device, a directory) is refused
    without reading: opened non-blocking, so a FIFO with no writer fails at once instead of hanging."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyMaterialError(f"{path}: cannot read key file ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise KeyMaterialError(f"{path}: key file must be a regular file, this is {_file_kind(mode)}; "
                                   f"write the key to a file (mode 0600) and give that")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(64 * 1024 + 1)  # a key is 32 bytes or 64 hex digits: never read a huge file whole
    except OSError as exc:
        raise KeyMaterialError(f"{path}: cannot read key file ({exc.strerror})") from None
    finally:
        os.close(fd)
    _warn_if_readable(path)
    return parse_key(raw, str(path), fmt)


def key_format(fmt: str | None = None) -> str:
    return fmt or os.environ.get(KEY_FORMAT_ENV) or "hex"


#: ``$EDGEPRO_BENCH_KEY`` as it was given, once :func:`take_env_key` moved it out of ``os.environ``
_env_key: str | None = None


def take_env_key() -> None:
    """Move ``$EDGEPRO_BENCH_KEY`` out of ``os.environ`` into this process's memory (parsed later, by
    :func:`load_key`), so that no child process started from now on inherits the key. Call it before starting any
    (the CLI does, first thing); :func:`load_key` calls it too. Setting the variable again replaces the held key."""
    global _env_key
    value = os.environ.pop(KEY_ENV, None)
    if value is not None:
        _env_key = value


def forget_env_key() -> None:
    """Drop the key :func:`take_env_key` holds (tests, and a process that is done with it)."""
    global _env_key
    _env_key = None


def _find_key(key_file: str | os.PathLike | None, fmt: str) -> tuple[bytes | None, str]:
    """The key from the first source given, and where it came from (for messages)."""
    if key_file is not None:
        return read_key_file(key_file, fmt), f"key file {key_file}"
    take_env_key()
    if _env_key is not None:
        return parse_key(_env_key.encode(), f"${KEY_ENV}", "hex"), f"${KEY_ENV}"
    if KEY_FILE_ENV in os.environ:
        if not os.environ[KEY_FILE_ENV]:
            raise KeyMaterialError(f"${KEY_FILE_ENV}: set but empty")
        return read_key_file(os.environ[KEY_FILE_ENV], fmt), f"${KEY_FILE_ENV} ({os.environ[KEY_FILE_ENV]})"
    return None, f"no key file given, ${KEY_ENV} and ${KEY_FILE_ENV} unset"


def load_key(key_file: str | os.PathLike | None = None, fmt: str | None = None) -> bytes | None:
    """The device key from ``key_file``, else ``$EDGEPRO_BENCH_KEY`` (hex; taken out of the environment, see
    :func:`take_env_key`), else ``$EDGEPRO_BENCH_KEY_FILE``.

    Returns ``None`` only when no source is given at all; a source that is given but unusable is an error.
    """
    return _find_key(key_file, key_format(fmt))[0]


def device_key(key_file: str | os.PathLike | None = None, fmt: str | None = None,
               default: str | os.PathLike | None = None, create: bool = True, expect_id: str | None = None) -> bytes:
    """The device key as :func:`load_key` finds it, else the one in ``default`` (created there once, mode 0600,
    when ``create``).

    A process that must use someone else's key (a Dask worker: ``create=False`` and ``expect_id``, the
    :func:`key_id` of the run's key) never creates one, and refuses a key whose id differs: either is a
    :class:`KeyMaterialError` naming both key ids and where it looked.
    """
    key, where = _find_key(key_file, key_format(fmt))
    if key is None and default is not None:
        default = Path(default)
        if create or default.exists():
            key, where = create_key_file(default), str(default)
        else:
            where = f"{where}, no {default}"
    if key is None:
        wanted = f" (the run's key id is {expect_id})" if expect_id else ""
        raise KeyMaterialError(f"no device key found{wanted}; looked in: {where}; a key is never created here: "
                               f"give the run's key (README: Run on a cluster)")
    if expect_id is not None and key_id(key) != expect_id:
        raise KeyMaterialError(f"wrong device key: key id {key_id(key)} from {where}, but the run's key id is "
                               f"{expect_id}; give every worker the run's key (README: Run on a cluster)")
    return key


def create_key_file(path: str | os.PathLike) -> bytes:
    """Create a fresh random key file (mode 0600) if none exists; return the key it holds."""
    path = Path(path)
    if path.exists():
        return read_key_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    while len(set(key)) == 1:  # astronomically unlikely, but parse_key would refuse it
        key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:  # another process created it first: use theirs
        return read_key_file(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def _check_length(blob: bytes, what: str) -> None:
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ArtifactError(f"{what}: truncated ciphertext ({len(blob)} bytes)")


def _auth_failed(what: str) -> ArtifactError:
    return ArtifactError(f"{what}: authentication failed (ciphertext, nonce or its binding to the artifact tampered)")


def _aead_key(key: bytes) -> bytes:
    return derive(key, "aead")


def encrypt(key: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    """Return ``nonce || ciphertext || tag`` under a fresh random 96-bit nonce."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(_aead_key(key)).encrypt(nonce, bytes(plaintext), aad)


def decrypt(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    """Authenticate and decrypt ``blob``; raise :class:`ArtifactError` naming ``what`` on any failure."""
    _check_length(blob, what)
    try:
        return AESGCM(_aead_key(key)).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise _auth_failed(what) from None


class GcmDecryptor:
    """Decrypts one artifact blob into a buffer it owns, again and again, without new allocations.

    ``cryptography``'s one-shot ``AESGCM.decrypt`` allocates and copies; ``update_into`` on a preallocated buffer
    runs near OpenSSL's speed. The plaintext is only exposed after the tag has been checked.
    """

    def __init__(self, key: bytes, blob: bytes, aad: bytes, what: str):
        _check_length(blob, what)
        self._key = _aead_key(key)
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
