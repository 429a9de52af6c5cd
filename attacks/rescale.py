"""``rescale-finetune``: normalize the stolen copy's per-layer weight scales, then fine-tune with the thief's recipe.

A protector that only rescales weights (a secret positive factor per layer or output channel, undone on the device)
leaves every unit's function intact up to that factor. Fine-tuned at a fixed learning rate, such a copy fails
(factors like ×100 and ×0.01 wreck the optimisation) and the protector looks as strong as encryption. This attack
undoes the scale with no key and no data first (:func:`normalize`):

- every Conv/Linear layer's output channel ``c`` gets the per-channel weight norm of a fresh initialization of the
  same architecture (``loot.model_factory()``; the root mean square of that layer's channel norms: channel indices
  of two models do not correspond) — ``W[c] *= s[c]`` and ``b[c] *= s[c]`` with ``s[c] > 0``. Through ReLU (and
  max-pooling), ``relu(s·z) = s·relu(z)``: each unit keeps its function up to a positive factor, and a secret
  positive factor on the channel's weights and bias cancels exactly (``normalize`` of a secretly scaled copy equals
  ``normalize`` of the clean one);
- a BatchNorm that directly follows such a layer (in execution order, same channel count) gets its running mean and
  variance scaled by ``s`` and ``s²`` (and ``γ`` corrected for ``eps``), so the pair's output does not change with
  the layer's scale; then every BatchNorm's affine ``(γ, β)`` is normalized like a layer (``|γ|`` to the fresh
  init's, ``β`` by the same factor);
- ``per="layer"`` uses one factor per layer (the layer's weight norm) instead, for a protector that scales whole
  layers.

Then (``recalibrate_bn``) the BatchNorm running statistics are re-estimated on the thief's labeled data, and the
copy is fine-tuned with :meth:`~attacks.base.ThiefContext.fit` on the thief's labeled fraction.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import Attack, Loot, Outcome, PlotSpec, ThiefContext
from .finetune import check_fractions
from .registry_instance import attacks

#: layers whose weight's first dimension is the output channel
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class RescaleParams:
    #: the thief's labeled fraction(s) of the training set
    fractions: list = field(default_factory=lambda: [0.01, 0.1])
    #: ``channel``: one factor per output channel; ``layer``: one per layer
    per: str = "channel"
    #: re-estimate BatchNorm running statistics on the thief's data before fine-tuning
    recalibrate_bn: bool = True

    def validate(self) -> None:
        check_fractions(list(self.fractions))
        if self.per not in ("channel", "layer"):
            raise ValueError(f"parameter 'per' must be 'channel' or 'layer', got {self.per!r}")


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the leaf modules in the order one forward pass on ``example`` calls them (first call each)."""
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if not any(True for _ in m.children()):
            handles.append(m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return list(dict.fromkeys(order))


def followers(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Layer name -> the BatchNorm that directly follows it (next leaf called, same channel count)."""
    modules = dict(model.named_modules())
    order = execution_order(model, example)
    out = {}
    for a, b in zip(order, order[1:]):
        layer, norm = modules[a], modules[b]
        if isinstance(layer, LAYERS) and isinstance(norm, NORMS) and norm.num_features == layer.weight.shape[0]:
            out[a] = b
    return out


def _channel_norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().flatten(1).norm(dim=1) if w.dim() > 1 else w.detach().abs()


def _rms(v: torch.Tensor) -> float:
    return float(v.pow(2).mean().sqrt())


def _factors(current: torch.Tensor, target: float, per: str) -> torch.Tensor:
    """Positive factors that bring ``current`` (per-channel norms) to ``target`` (1 where undefined)."""
    if per == "layer":
        rms = _rms(current)
        s = target / rms if math.isfinite(rms) and rms > 0 else 1.0
        return torch.full_like(current, s)
    s = target / current
    return torch.where(torch.isfinite(s) & (current > 0), s, torch.ones_like(s))


def _scale_rows(t: torch.Tensor | None, s: torch.Tensor) -> None:
    if t is not None:
        t.mul_(s.view(-1, *([1] * (t.dim() - 1))).to(t.dtype))


def _rescale_input_of(bn: nn.Module, s: torch.Tensor) -> None:
    """Keep a BatchNorm's eval-mode output as it was when its input channels are scaled by ``s``: mean ``·s``,
    variance ``·s²``, and ``γ`` corrected for ``eps`` (``sqrt(s²σ² + eps) ≠ s·sqrt(σ² + eps)``)."""
    if bn.running_mean is None:
        return
    var = bn.running_var.clone()
    bn.running_mean.mul_(s.to(var.dtype))
    bn.running_var.mul_(s.pow(2).to(var.dtype))
    if bn.weight is not None:
        bn.weight.mul_((bn.running_var + bn.eps).sqrt() / (s.to(var.dtype) * (var + bn.eps).sqrt()))


@torch.no_grad()
def normalize(model: nn.Module, reference: nn.Module, example: torch.Tensor, per: str = "channel") -> dict[str, Any]:
    """Bring ``model``'s per-channel (or per-layer) weight scales to ``reference``'s (a fresh init of the same
    architecture), in place; see the module docstring. Layers are matched by name and weight shape; a layer with no
    match is left as is. Returns statistics of the factors applied."""
    ref = dict(reference.named_modules())
    follow = followers(model, example)
    modules = dict(model.named_modules())
    logs: list[torch.Tensor] = []
    layers = skipped = 0
    # layers first (they adjust the BatchNorm after them), then every BatchNorm's affine
    for kinds in (LAYERS, NORMS):
        for name, m in modules.items():
            if not isinstance(m, kinds):
                continue
            r = ref.get(name)
            w, rw = m.weight, getattr(r, "weight", None)
            if w is None or rw is None or type(r) is not type(m) or rw.shape != w.shape:
                skipped += w is not None
                continue
            s = _factors(_channel_norms(w), _rms(_channel_norms(rw)), per)
            _scale_rows(w, s)
            _scale_rows(m.bias, s)
            if name in follow:
                _rescale_input_of(modules[follow[name]], s)
            logs.append(s.log10())
            layers += 1
    allv = torch.cat(logs) if logs else torch.zeros(1)
    return {"layers_normalized": layers, "layers_skipped": skipped,
            "max_abs_log10_scale": float(allv.abs().max()), "mean_log10_scale": float(allv.mean())}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch: int = 256) -> int:
    """Re-estimate every BatchNorm's running statistics on ``x`` (a cumulative average over one pass); returns the
    number of BatchNorm layers."""
    norms = [m for m in model.modules() if isinstance(m, NORMS) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()  # dropout and the like stay off: only the BatchNorm layers see the data in training mode
    for m in norms:
        m.train()
    for i in range(0, len(x), batch):
        if len(x[i : i + batch]) > 1:  # a BatchNorm cannot normalize a single sample in training mode
            model(x[i : i + batch])
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    for m, training in modes.items():
        m.training = training
    return len(norms)


@attacks.register()
class RescaleFinetune(Attack):
    """Normalize the stolen copy's weight scales to a fresh init's, then fine-tune it with the thief's recipe."""

    name = "rescale-finetune"
    Params = RescaleParams

    def cells(self) -> list[str]:
        return [f"f={f:g}" for f in self.params.fractions]

    def plot(self, cell: str) -> PlotSpec:
        return PlotSpec(figure="rescale-finetune", title="Rescaled fine-tuning vs scratch", style="budget",
                        xlabel="thief's labeled fraction of training set", x=float(cell.removeprefix("f=")),
                        xscale="log")

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        fraction = float(cell.removeprefix("f="))
        x, y = ctx.thief_data(fraction, ctx.seed)
        model = loot.stolen_model()
        for p in model.parameters():
            p.requires_grad_(True)
        extra = normalize(model, loot.model_factory(), x[:1], self.params.per)
        if self.params.recalibrate_bn:
            extra["bn_recalibrated"] = recalibrate_batchnorm(model, x)
        model.eval()
        fit = ctx.fit(lambda: copy.deepcopy(model), x, y)
        extra.update(lr=fit.lr, epoch=fit.epoch, epochs_run=fit.epochs_run, val_samples=fit.val_samples)
        return Outcome(cell, fit.model, (fraction, fit.epochs_run), extra=extra, val_acc=fit.val_acc)
