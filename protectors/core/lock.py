"""Lock sites: named modules whose output is multiplied by a per-neuron mask, inside the graph.

A :class:`LockedSite` wraps the module at a lock site. It multiplies the output by a mask broadcast over the
neuron (channel) axis 1. In training, a per-sample mask ``(B, C)`` may be set for one batch (EdgePro's locked and
released samples). At inference the mask is applied in place, which exports to ONNX as one ``Mul``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def channel_view(mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A per-neuron ``mask`` of shape ``(C,)`` viewed to broadcast over ``out``'s channel axis 1; a mask already
    of ``out``'s rank (e.g. an ONNX graph input fed pre-shaped) is returned as it is."""
    return mask if mask.dim() == out.dim() else mask.view(1, -1, *([1] * (out.dim() - 2)))


class LockedSite(nn.Module):
    """Wraps ``inner`` and multiplies its output by ``mask`` (shape ``(C,)``) along dim 1."""

    def __init__(self, inner: nn.Module, mask: torch.Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.mask: torch.Tensor | None
        self.register_buffer("mask", None if mask is None else mask.detach().clone(), persistent=False)
        self._view: torch.Tensor | None = None
        self.batch_mask: torch.Tensor | None = None
        #: a mask given from outside the module for one call, e.g. a graph input when exporting to ONNX
        self.external: torch.Tensor | None = None
        self.record: list[torch.Tensor] | None = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = None if mask is None else mask.detach().clone()
        self._view = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.record is not None:
            # Per-neuron mean activation (a conv neuron is a channel: mean over all its positions).
            self.record.append(out.detach().flatten(2).mean(2).sum(0) if out.dim() > 2 else out.detach().sum(0))
        if self.batch_mask is not None:
            return out * self.batch_mask.view(out.shape[0], out.shape[1], *([1] * (out.dim() - 2)))
        if self.external is not None:
            return out * channel_view(self.external, out)
        mask = self.mask
        if mask is None:
            return out
        if self._view is None or self._view.dim() != out.dim() or self._view.device != out.device:
            self._view = channel_view(mask.to(out.device), out)
        if out is x or out.requires_grad or (torch.is_grad_enabled() and self.training):
            return out * self._view
        return out.mul_(self._view)


class MaskedSite(nn.Module):
    """The deploy-time lock: the site's own activation, then one in-place multiply by a fixed mask.

    Nothing else runs per call (no training branches, no buffer lookups): at batch 1 on a small model, eager
    PyTorch spends microseconds per extra op and per extra module call, which is the whole cost of EdgePro's lock.
    A plain ReLU at the site is called as ``torch.relu`` rather than through its module.
    """

    def __init__(self, inner: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.inner = inner
        if type(inner) is nn.ReLU:
            fn = torch.relu_ if inner.inplace else torch.relu
        else:
            fn = inner
        object.__setattr__(self, "fn", fn)  # not registered twice as a submodule
        self.mask = mask.detach().clone()
        self.view: torch.Tensor | None = None
        self.external: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        v = self.view
        if v is None or self.external is not None:
            return self._first(out)
        return out.mul_(v)

    def _first(self, out: torch.Tensor) -> torch.Tensor:
        if self.external is not None:
            return out * channel_view(self.external, out)
        self.view = channel_view(self.mask.to(out.device), out)
        return out.mul_(self.view)

    def _apply(self, fn, recurse=True):
        self.mask, self.view = fn(self.mask), None
        return super()._apply(fn, recurse)


def install_fixed(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Wrap each site in a :class:`MaskedSite` with its mask (deployment: inference only)."""
    for name, mask in masks.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise KeyError(name) from None
        if isinstance(mod, (LockedSite, MaskedSite)):
            mod = mod.inner
        model.set_submodule(name, MaskedSite(mod, mask))
    return model


def install(model: nn.Module, sites: Iterable[str]) -> dict[str, LockedSite]:
    """Wrap each named site of ``model`` in a :class:`LockedSite` (idempotent); return them by name."""
    out = {}
    for name in sites:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise KeyError(name) from None
        if not isinstance(mod, LockedSite):
            mod = LockedSite(mod)
            model.set_submodule(name, mod)
        out[name] = mod
    return out


def install_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Wrap each named site in a :class:`LockedSite` holding its mask (differentiable: a secret applied to a copy
    that may still be trained or attacked); a site the model does not have is a ``KeyError``."""
    for name, site in install(model, masks).items():
        site.set_mask(masks[name])
    return model


def remove(model: nn.Module) -> nn.Module:
    """Unwrap every :class:`LockedSite`, so the state dict has the plain architecture's keys again."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (LockedSite, MaskedSite)):
            model.set_submodule(name, mod.inner)
    return model


def sites_of(model: nn.Module) -> dict[str, LockedSite | MaskedSite]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LockedSite, MaskedSite))}


@torch.no_grad()
def site_widths(model: nn.Module, sites: Iterable[str], example: torch.Tensor) -> dict[str, int]:
    """Number of neurons (dim 1) at each site, found by one forward pass on ``example``."""
    widths: dict[str, int] = {}
    handles = []
    for name in sites:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(lambda m, i, o, n=name: widths.__setitem__(n, o.shape[1])))
    was = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return widths
