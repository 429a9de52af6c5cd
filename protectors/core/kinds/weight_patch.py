"""Secret kind ``weight-correction``: positions and original values of perturbed weights (NNSplitter, AdvParams).

This module owns the kind's secret format, :class:`WeightPatch`: per state entry (a parameter or buffer named as in
``model.state_dict()``), the tensor's shape, the flat positions the secret covers and the values there. It writes
the patch back onto a model (:meth:`WeightPatch.restore`, or :meth:`WeightPatch.subtract` for a patch of offsets),
moves it onto a structurally pruned copy (:meth:`WeightPatch.remap`) and reads and writes it as safetensors (never
pickle). A protector of another kind may use it for the same machinery (``shield`` keeps its withheld weights in
one: whole tensors are entries without positions).

Public metadata (``artifact.meta``) of a ``weight-correction`` artifact, all optional:

- ``keyspace_bits`` — log2 of the position choices the thief faces (a number in [0, 256]: the 256-bit key caps it);
- never the secret itself: no top-level or ``params`` field named ``index``, ``positions``, ``values``, ``delta``
  or ``original_values``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..errors import ArtifactError
from ..pruning import Pruned

KIND = "weight-correction"
#: plaintext metadata fields that would disclose the secret
SECRET_FIELDS = ("index", "positions", "values", "delta", "original_values")


def check_public_meta(meta: dict[str, Any]) -> None:
    """Raise ``ValueError`` when the plaintext metadata breaks the kind's schema (called at ``protect``)."""
    bits = meta.get("keyspace_bits")
    if bits is not None and (not isinstance(bits, (int, float)) or isinstance(bits, bool)
                             or not 0 <= bits <= 256):
        raise ValueError(f"public metadata 'keyspace_bits' of a weight-correction artifact must be a number in "
                         f"[0, 256], got {bits!r}")
    for where, fields in (("", meta), ("params.", meta.get("params") or {})):
        leaked = [f for f in SECRET_FIELDS if f in fields]
        if leaked:
            raise ValueError(f"public metadata '{where}{leaked[0]}' of a weight-correction artifact would disclose "
                             "the secret (positions and values go in the encrypted file)")


@dataclass(frozen=True)
class Patch:
    """One state entry's part of a patch: the tensor's shape and the values at flat positions ``index`` (int64,
    1-D), or, with ``index`` None, the whole tensor (``values`` has ``shape``)."""

    shape: tuple[int, ...]
    values: torch.Tensor
    index: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """How many values the patch holds for this entry."""
        return self.values.numel()


def _module(name: str) -> str:
    return name.rpartition(".")[0]


@dataclass(frozen=True)
class WeightPatch:
    """The secret of a ``weight-correction`` protector: state entry name → :class:`Patch`."""

    entries: dict[str, Patch] = field(default_factory=dict)

    # -- building one ---------------------------------------------------------------------------------------------
    @classmethod
    def gather(cls, state: Mapping[str, torch.Tensor], positions: Mapping[str, torch.Tensor]) -> WeightPatch:
        """The values of ``state`` (a ``state_dict``) at the given flat positions, per entry."""
        entries = {}
        for name, index in positions.items():
            t = state[name].detach().cpu()
            entries[name] = Patch(tuple(t.shape), t.reshape(-1)[index].clone(), index.to(torch.int64))
        return cls(entries)

    @classmethod
    def whole(cls, state: Mapping[str, torch.Tensor], names: Iterable[str]) -> WeightPatch:
        """Whole entries of ``state``: every value of each named tensor."""
        return cls({n: Patch(tuple(state[n].shape), state[n].detach().cpu().clone()) for n in names})

    @classmethod
    def changed(cls, original: Mapping[str, torch.Tensor], perturbed: Mapping[str, torch.Tensor],
                names: Iterable[str]) -> WeightPatch:
        """The original values at every position where ``perturbed`` differs from ``original`` (entries with no
        change are left out)."""
        entries = {}
        for name in names:
            w, w0 = perturbed[name].detach(), original[name].detach()
            index = torch.nonzero((w != w0).view(-1)).view(-1)
            if len(index):
                entries[name] = Patch(tuple(w0.shape), w0.reshape(-1)[index].cpu().clone(), index.cpu())
        return cls(entries)

    # -- what it holds ----------------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """How many values the patch holds in all."""
        return sum(p.size for p in self.entries.values())

    def zeroed(self) -> WeightPatch:
        """The same positions with every value 0 (what a thief's copy holds when they are withheld and zeroed)."""
        return WeightPatch({n: Patch(p.shape, torch.zeros_like(p.values), p.index) for n, p in self.entries.items()})

    def offsets(self, perturbed: Mapping[str, torch.Tensor], what: str = "weight patch") -> WeightPatch:
        """``perturbed − original`` at every position, in float64 (a patch of offsets, for :meth:`subtract`).

        The difference of two float32 values is exact in float64 unless they differ by 2^29 or more in magnitude,
        so subtracting the offsets from an untouched perturbed copy gives the originals back."""
        entries = {}
        for name, p in self.entries.items():
            t = _entry(perturbed, name, p, what)
            flat = t.detach().reshape(-1)
            now = flat if p.index is None else flat[p.index.to(flat.device)]
            entries[name] = Patch(p.shape, (now.double().cpu() - p.values.reshape(-1).double()).view(
                p.values.shape), p.index)
        return WeightPatch(entries)

    # -- writing it back --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self, model: nn.Module, what: str = "weight patch") -> nn.Module:
        """Write the values into ``model`` at their positions, in place (shapes must match: :meth:`remap` first)."""
        state = model.state_dict()
        for name, p in self.entries.items():
            t = _entry(state, name, p, what)
            if p.index is None:
                t.copy_(p.values)
            elif len(p.index):
                t.view(-1)[p.index.to(t.device)] = p.values.to(t.device, t.dtype)
        return model

    @torch.no_grad()
    def subtract(self, model: nn.Module, what: str = "weight patch") -> nn.Module:
        """``w[i] -= value`` at every position, in float64, in place: undoes a patch of :meth:`offsets` while
        keeping whatever else changed the weights since (fine-tuning)."""
        state = model.state_dict()
        for name, p in self.entries.items():
            t = _entry(state, name, p, what)
            if p.values.numel() == 0:
                continue
            flat = t.view(-1)
            i = torch.arange(flat.numel(), device=flat.device) if p.index is None else p.index.to(flat.device)
            flat[i] = (flat[i].double() - p.values.reshape(-1).to(flat.device, torch.float64)).to(flat.dtype)
        return model

    # -- structural pruning -----------------------------------------------------------------------------------------
    def remap(self, model: nn.Module, pruned: Pruned | None) -> tuple[WeightPatch, list[str]]:
        """The patch on a (maybe structurally pruned) copy: the entries that still map, and the names that do not.

        An entry whose tensor kept its shape is kept as it is. One that pruning reshaped maps its output channels
        (dim 0) through ``pruned.kept[module]`` and its input channels (dim 1) through the kept channels of the most
        recent pruned module, run before it, whose kept count explains the new input width (:func:`input_channels`;
        a linear layer after a flatten sees each channel ``spatial`` times, channel-major). Positions whose channel
        was pruned are dropped: their weight is gone with it. An entry missing from the model, or whose new shape
        cannot be explained that way (or with no ``pruned`` record), is not mapped: its name is returned.
        """
        state = model.state_dict()
        modules = dict(model.named_modules())
        reshaped = [n for n, p in self.entries.items() if n in state and tuple(state[n].shape) != p.shape]
        feeders: dict[str, list[list[int]]] = {}
        if pruned is not None and reshaped:
            sources, _ = pruned.feeders(model, sorted({_module(n) for n in reshaped}))
            feeders = {m: [pruned.kept[s] for s in names] for m, names in sources.items()}
        out: dict[str, Patch] = {}
        unmapped = [n for n in self.entries if n not in state]
        for name, p in self.entries.items():
            if name not in state:
                continue
            new = tuple(state[name].shape)
            if new == p.shape:
                out[name] = p
                continue
            module = _module(name)
            groups = getattr(modules.get(module), "groups", 1)
            maps = (channel_maps(p.shape, new, pruned.kept.get(module), feeders.get(module, []), groups)
                    if pruned is not None else None)
            if maps is None:
                unmapped.append(name)
                continue
            out[name] = _moved(p, new, maps)
        return WeightPatch(out), unmapped

    # -- bytes ------------------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """safetensors: ``values/NAME`` per entry, with ``index/NAME`` for a partial one, whose tensor's shape is in
        the header's metadata (``shapes``: JSON, name → shape)."""
        tensors, shapes = {}, {}
        for name, p in self.entries.items():
            tensors[f"values/{name}"] = p.values.contiguous()
            if p.index is not None:
                tensors[f"index/{name}"] = p.index.to(torch.int64).contiguous()
                shapes[name] = list(p.shape)
        return st_save(tensors, metadata={"shapes": json.dumps(shapes, separators=(",", ":"))})

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> WeightPatch:
        """Parse :meth:`to_bytes`'s output; anything malformed is an :class:`ArtifactError` naming ``what``."""
        data = bytes(data)
        try:
            tensors = st_load(data)
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{what}: not a readable safetensors file ({exc})") from None
        try:
            shapes = json.loads((header.get("__metadata__") or {}).get("shapes", "{}"))
            shapes = {str(n): tuple(int(d) for d in s) for n, s in shapes.items()}
        except (ValueError, TypeError, AttributeError):
            raise ArtifactError(f"{what}: malformed weight patch (shapes in the metadata)") from None
        values, index = {}, {}
        for key, t in tensors.items():
            part, _, name = key.partition("/")
            if not name or part not in ("values", "index"):
                raise ArtifactError(f"{what}: malformed weight patch (unexpected tensor {key!r})")
            (values if part == "values" else index)[name] = t
        if set(index) - set(values) or set(index) != set(shapes):
            raise ArtifactError(f"{what}: malformed weight patch (every partial tensor needs values, positions and "
                                "its shape)")
        return cls({name: _checked(name, v, index.get(name), shapes.get(name), what) for name, v in values.items()})


def _checked(name: str, values: torch.Tensor, index: torch.Tensor | None, shape: tuple[int, ...] | None,
             what: str) -> Patch:
    if index is None:
        return Patch(tuple(values.shape), values)
    if (any(d < 0 for d in shape) or index.dtype != torch.int64 or index.dim() != 1 or values.dim() != 1
            or len(values) != len(index)
            or (len(index) and not 0 <= int(index.min()) <= int(index.max()) < math.prod(shape))):
        raise ArtifactError(f"{what}: malformed weight patch for {name!r} (positions out of range, or not one value "
                            "per position)")
    return Patch(shape, values, index)


def _entry(state: Mapping[str, torch.Tensor], name: str, p: Patch, what: str) -> torch.Tensor:
    if name not in state:
        raise ArtifactError(f"{what}: patched tensor {name!r} is not in the model")
    t = state[name]
    if tuple(t.shape) != p.shape:
        raise ArtifactError(f"{what}: patched tensor {name!r} has shape {tuple(t.shape)} in the model, "
                            f"{p.shape} in the patch")
    return t


def input_channels(old: int, new: int, feeders: list[list[int]], spatial_ok: bool = True) -> list[int] | None:
    """Original input indices of a layer whose input width went from ``old`` to ``new``: from the most recent pruned
    module before it whose kept channels explain the change (``spatial`` positions per channel, channel-major, for
    a linear layer after a flatten; only with ``spatial_ok``). The most recent one is not always the right one: a
    ResNet shortcut conv runs after its block's last BN but reads the block's input."""
    for kept in feeders:
        if not kept or new % len(kept):
            continue
        spatial = new // len(kept)
        if (spatial > 1 and not spatial_ok) or old % spatial or max(kept) >= old // spatial \
                or len(kept) == old // spatial:
            continue
        return [kept[j // spatial] * spatial + j % spatial for j in range(new)]
    return None


def channel_maps(old: tuple[int, ...], new: tuple[int, ...], kept: list[int] | None, feeders: list[list[int]],
                 groups: int = 1) -> list[torch.Tensor] | None:
    """Original indices along dims 0 (and 1) for every position of the reshaped tensor, or ``None`` when the new
    shape cannot be explained by ``kept`` (the module's surviving output channels) and ``feeders`` (the kept
    channels of the pruned modules run before it, most recent first)."""
    if len(old) != len(new) or old[2:] != new[2:] or not old:
        return None
    outs = list(range(old[0])) if new[0] == old[0] else kept
    if outs is None or len(outs) != new[0] or max(outs, default=0) >= old[0]:
        return None
    maps = [torch.tensor(outs, dtype=torch.long)]
    if len(old) >= 2:
        if new[1] == old[1]:
            ins = list(range(old[1]))
        elif groups != 1:  # a grouped conv's input channels are per group: no single map explains them
            return None
        else:  # a flatten only ever feeds a linear layer: a conv's input maps channel for channel
            ins = input_channels(old[1], new[1], feeders, spatial_ok=len(old) == 2)
        if ins is None:
            return None
        maps.append(torch.tensor(ins, dtype=torch.long))
    return maps


def _moved(p: Patch, new: tuple[int, ...], maps: list[torch.Tensor]) -> Patch:
    """``p`` on the reshaped tensor: ``maps[d][k]`` is the original index of new index ``k`` along dim ``d``."""
    if p.index is None:
        values = p.values
        for dim, m in enumerate(maps):
            values = values.index_select(dim, m)
        return Patch(new, values.contiguous())
    inverse = []
    for dim, m in enumerate(maps):
        inv = torch.full((p.shape[dim],), -1, dtype=torch.long)
        inv[m] = torch.arange(len(m))
        inverse.append(inv)
    coords = list(torch.unravel_index(p.index, p.shape))
    for dim, inv in enumerate(inverse):
        coords[dim] = inv[coords[dim]]
    keep = torch.stack(coords[: len(inverse)]).ge(0).all(0)
    coords = [c[keep] for c in coords]
    index = torch.zeros(int(keep.sum()), dtype=torch.long)
    for dim, c in enumerate(coords):  # ravel by hand: strides of the new shape
        index += c * math.prod(new[dim + 1:])
    return Patch(new, p.values[keep], index)
