"""Model weights as safetensors bytes (never pickle)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import ArtifactError

if TYPE_CHECKING:
    from .artifact import Artifact
    from .base import ModelFactory

#: the conventional name of an artifact's plaintext weights file
WEIGHTS = "weights.safetensors"


def state_bytes(model: nn.Module) -> bytes:
    """Serialize the model's parameters and buffers (contiguous CPU copies) as safetensors."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def load_state_bytes(model: nn.Module, data: bytes | bytearray | memoryview, what: str) -> nn.Module:
    """Load safetensors ``data`` into ``model`` in place; any mismatch is an :class:`ArtifactError`."""
    try:
        state = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{what}: not a readable safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"{what}: weights do not fit the model ({first})") from None
    return model


def load_weights(artifact: Artifact, model_factory: ModelFactory, name: str = WEIGHTS) -> nn.Module:
    """The model with the artifact's plaintext weights file ``name`` loaded (eval mode)."""
    return load_state_bytes(model_factory(), artifact.file(name), f"{artifact.where}/{name}").eval()


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def safetensors_views(buf: bytearray | memoryview, what: str) -> dict[str, torch.Tensor]:
    """Tensors that *share memory* with a safetensors buffer (no copy).

    Used to make a model's parameters live inside a decryption buffer: decrypting into the buffer then updates
    the weights in place, and wiping it removes them.
    """
    import json

    mv = memoryview(buf)
    if len(mv) < 8:
        raise ArtifactError(f"{what}: truncated safetensors data")
    n = int.from_bytes(mv[:8], "little")
    try:
        header = json.loads(bytes(mv[8 : 8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{what}: unreadable safetensors header") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = info["shape"]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{what}: bad safetensors entry {name!r}") from None
        if not 0 <= start <= end <= len(mv) - base:
            raise ArtifactError(f"{what}: safetensors entry {name!r} points outside the data")
        if end == start:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(mv, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start)
        out[name] = t.view(shape)
    return out


def bind_views(model: nn.Module, views: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Make ``model``'s parameters and buffers the given tensors (shared memory), inference only."""
    try:
        model.load_state_dict(views, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"{what}: weights do not fit the model ({first})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model
