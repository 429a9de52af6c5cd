"""Messages between the harness and its attack process: no pickle in either direction.

A message is a JSON header and named binary blobs, each length-prefixed (``<Q`` little-endian): the header's
length, the header (which lists the blobs' names and lengths), then the blobs. Tensors travel as safetensors
(:func:`pack`, :func:`unpack`). What the attack process sends is untrusted input to the harness: sizes are capped,
the header must be a JSON object, and the blobs are bytes until a safetensors reader parses them.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from protectors.core.errors import BenchError

#: the largest header a message may have (JSON: the attack's extra numbers, a guess of the secret)
MAX_HEADER = 16 << 20
#: the largest message in all (a thief's data set, a model's weights)
MAX_MESSAGE = 8 << 30
_LEN = struct.Struct("<Q")


class WireClosed(BenchError):
    """The other end closed the channel (the process exited)."""


class WireError(BenchError):
    """A malformed message."""


def _plain(value: Any) -> Any:
    """JSON for the numbers attacks produce besides Python's own: a numpy or torch scalar as a float (what the
    harness's record writer makes of it, so isolated and in-process records agree), an array as a list."""
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) == 0 and hasattr(value, "item"):
        return float(value.item())
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=_plain, allow_nan=True).encode()


def send(f: BinaryIO, header: dict[str, Any], blobs: dict[str, bytes] | None = None) -> None:
    blobs = blobs or {}
    head = dumps({**header, "_blobs": [[name, len(b)] for name, b in blobs.items()]})
    f.write(_LEN.pack(len(head)))
    f.write(head)
    for b in blobs.values():
        f.write(b)
    f.flush()


def _read(f: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = f.read(left)
        if not chunk:
            raise WireClosed("channel closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(f: BinaryIO) -> tuple[dict[str, Any], dict[str, bytes]]:
    (n,) = _LEN.unpack(_read(f, _LEN.size))
    if n > MAX_HEADER:
        raise WireError(f"message header of {n} bytes (at most {MAX_HEADER})")
    try:
        header = json.loads(_read(f, n))
    except (ValueError, RecursionError) as exc:
        raise WireError(f"message header is not JSON: {str(exc)[:120] or 'nested too deeply'}") from None
    if not isinstance(header, dict):
        raise WireError("message header is not a JSON object")
    listed = header.pop("_blobs", [])
    if (not isinstance(listed, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                                and isinstance(e[1], int) and e[1] >= 0 for e in listed)):
        raise WireError("message lists its blobs wrongly")
    if sum(e[1] for e in listed) > MAX_MESSAGE:
        raise WireError(f"message of more than {MAX_MESSAGE} bytes")
    blobs = {name: _read(f, size) for name, size in listed}
    return header, blobs


def pack(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors as safetensors bytes (each copied, contiguous: shared or strided storage is fine)."""
    return _st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})


def unpack(blob: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return _st_load(blob)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on bad bytes
        raise WireError(f"{what}: not safetensors ({str(exc).splitlines()[0][:120]})") from None
