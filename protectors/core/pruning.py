"""What structural pruning kept, in terms every protector can use to re-apply a per-neuron secret.

A structural pruning attack reports, per pruned module (conv, linear, batch-norm), the original indices of the
output channels that survived. A protector whose secret names neurons at a *site* (any module's output) finds the
site's channels by :meth:`Pruned.kept_at`: the last pruned module that runs before the site's output is complete
and has the site's width is where its channels come from (a ReLU's conv; a residual stage's last batch-norm, which
Torch-Pruning prunes together with the stage's shortcut).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Pruned:
    """``kept``: module name → surviving original output-channel indices; ``example``: one input for the model."""

    kept: dict[str, list[int]]
    example: torch.Tensor

    @torch.no_grad()
    def kept_at(self, model: nn.Module, sites: list[str] | tuple[str, ...]) -> dict[str, list[int]]:
        """Per site of the (pruned) ``model``, the original indices of its surviving neurons (sites whose
        channels were not pruned are left out)."""
        order: list[tuple[str, int]] = []
        ends: dict[str, tuple[int, int]] = {}
        handles = []
        for name, mod in model.named_modules():
            if name in self.kept:
                handles.append(mod.register_forward_hook(
                    lambda m, i, o, n=name: order.append((n, o.shape[1]))))
        def end(site: str, out: torch.Tensor) -> None:  # a hook that returns a value would replace the output
            ends.setdefault(site, (len(order), out.shape[1]))

        for s in sites:
            handles.append(model.get_submodule(s).register_forward_hook(lambda m, i, o, s=s: end(s, o)))
        was = model.training
        model.eval()
        try:
            model(self.example)
        finally:
            model.train(was)
            for h in handles:
                h.remove()
        out = {}
        for s, (n, width) in ends.items():
            source = next((name for name, w in reversed(order[:n]) if w == width), None)
            if source is not None and len(self.kept[source]) == width:
                out[s] = list(self.kept[source])
        return out

    @torch.no_grad()
    def feeders(self, model: nn.Module, names: list[str]) -> tuple[dict[str, list[str]], dict[str, int]]:
        """Per named module of the (pruned) ``model``: the pruned modules that ran before its input, most recent
        first, and its input width (one forward pass on ``example``). A protector maps a layer's input channels
        back to their original indices through the first feeder whose kept channels explain the width."""
        order: list[str] = []
        before: dict[str, tuple[int, int]] = {}

        def starts(name: str, x: torch.Tensor) -> None:  # a hook that returns a value would replace the input
            before.setdefault(name, (len(order), x.shape[1]))

        modules = dict(model.named_modules())
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: order.append(n))
                 for n, m in modules.items() if n in self.kept]
        hooks += [modules[n].register_forward_pre_hook(lambda m, i, n=n: starts(n, i[0])) for n in names
                  if n in modules]
        was = model.training
        model.eval()
        try:
            model(self.example.to(next(model.parameters()).device))
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        return ({n: list(reversed(order[:k])) for n, (k, _) in before.items()},
                {n: w for n, (_, w) in before.items()})
