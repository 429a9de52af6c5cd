"""Magnitude pruning of the stolen copy, with and without a short fine-tune.

- ``prune-unstructured``: global L1 magnitude pruning of every conv/linear weight (``torch.nn.utils.prune``), made
  permanent. Weights that are zero already count among the smallest: on a copy with zeroed secret weights
  (``shield`` ``magnitude``) a low ratio may prune nothing new, and the record says so (``zero_weights_before``).
- ``prune-channel``: structured L1 channel pruning with Torch-Pruning (the classifier is kept). Torch-Pruning
  silently prunes nothing when parameters are frozen, so the parameter count is checked to have dropped. The
  surviving output channels of every pruned module are reported (:class:`~protectors.core.pruning.Pruned`), so a
  per-neuron secret can be sliced to match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from protectors.core.pruning import Pruned

from .base import Attack, Loot, Outcome, PlotSpec, ThiefContext
from .finetune import check_fractions, finetune
from .registry_instance import attacks


@dataclass(frozen=True)
class PruneParams:
    ratios: list = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    finetune_epochs: int = 2
    fraction: float = 0.05

    def validate(self) -> None:
        if not self.ratios or not all(isinstance(r, (int, float)) and 0 < r < 1 for r in self.ratios):
            raise ValueError(f"parameter 'ratios' must be a non-empty list of numbers in (0, 1), got {self.ratios!r}")
        if self.finetune_epochs < 0:
            raise ValueError(f"parameter 'finetune_epochs' must be >= 0, got {self.finetune_epochs}")
        check_fractions([self.fraction])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


class _PruneAttack(Attack):
    Params = PruneParams

    def cells(self) -> list[str]:
        tail = [""] + (["+ft"] if self.params.finetune_epochs else [])
        return [f"r={r:g}{t}" for r in self.params.ratios for t in tail]

    def plot(self, cell: str) -> PlotSpec:
        return PlotSpec(figure="pruning", title="Accuracy vs pruning ratio", style="sweep", xlabel="pruning ratio",
                        x=float(cell.removeprefix("r=").removesuffix("+ft")),
                        series="+ft" if cell.endswith("+ft") else "")

    def prune(self, model: nn.Module, ratio: float, example: torch.Tensor) -> tuple[dict, Pruned | None]:
        raise NotImplementedError

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        ratio = float(cell.removeprefix("r=").removesuffix("+ft"))
        model = loot.stolen_model()
        for p in model.parameters():
            p.requires_grad_(True)
        x, y = ctx.thief_data(self.params.fraction, ctx.seed)
        extra, pruned = self.prune(model, ratio, x[:1])
        if cell.endswith("+ft"):
            # The recipe, capped at finetune_epochs per learning rate (the attack asks for less).
            fit = finetune(model, ctx, self.params.fraction, self.params.finetune_epochs)
            return Outcome(cell, fit.model, (self.params.fraction, fit.epochs_run), extra={**extra, "lr": fit.lr},
                           pruned=pruned, val_acc=fit.val_acc)
        # Data-free: the thief can still look at its own data to judge the result (it does not train on it).
        return Outcome(cell, model.eval(), (0.0, 0), extra=extra, pruned=pruned,
                       val_acc=ctx.evaluate(model, x, y))


@attacks.register()
class PruneUnstructured(_PruneAttack):
    """Global L1 magnitude pruning of all conv/linear weights."""

    name = "prune-unstructured"

    def prune(self, model, ratio, example):
        before = count_nonzero(model)
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        total = sum(m.weight.numel() for m, _ in layers)
        zeros_before = sum(int((m.weight == 0).sum()) for m, _ in layers)
        tprune.global_unstructured(layers, pruning_method=tprune.L1Unstructured, amount=ratio)
        for m, name in layers:
            tprune.remove(m, name)
        zeros = sum(int((m.weight == 0).sum()) for m, _ in layers)
        # The smallest weights may be zeros already (a copy whose secret weights were zeroed): then pruning removes
        # fewer than `ratio` new ones, or none. What must hold is that `ratio` of the weights are zero now.
        if zeros < round(ratio * total):
            raise RuntimeError(f"{self.name}: only {zeros} of {total} weights are zero after pruning at ratio {ratio}")
        return {"nonzero_before": before, "nonzero_after": count_nonzero(model), "zero_weights_before": zeros_before,
                "zero_weights_after": zeros}, None


@attacks.register()
class PruneChannel(_PruneAttack):
    """Structured L1 channel pruning with Torch-Pruning; the final classifier keeps its outputs."""

    name = "prune-channel"

    def prune(self, model, ratio, example):
        import torch_pruning as tp

        classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        before = count_params(model)
        model.eval()
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[classifier])
        names = {m: n for n, m in model.named_modules()}
        widths = {n: m.weight.shape[0] for n, m in model.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
        removed: dict[str, set[int]] = {}
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                if pruner.DG.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names:
                    removed.setdefault(names[dep.target.module], set()).update(int(i) for i in idxs)
            group.prune()
        after = count_params(model)
        if after >= before:
            raise RuntimeError(f"{self.name}: Torch-Pruning removed no parameters at ratio {ratio}")
        kept = {n: [i for i in range(widths[n]) if i not in gone] for n, gone in removed.items() if n in widths}
        return {"params_before": before, "params_after": after}, Pruned(kept, example)
