"""``weight-inspection``: data-free repair of perturbed weights by looking at their statistics.

Weight-perturbation protections (AdvParams, NNSplitter) leave a few weights far from where training put them; to hide
them, AdvParams keeps each moved value inside its layer's range, so many end up piled exactly on the same bound.
Both leave a statistical trace in the stolen copy that needs no data to find. For every conv/linear ``weight`` of the
stolen copy (biases and norm layers are left alone), this attack flags:

- **outliers**: robust z-score ``|w − median| / (1.4826 · MAD) > z`` (the MAD scaled to a normal's σ);
- **clamp piles**: values that occur at least ``pile`` times *exactly* and either are the layer's min or max or lie
  in the tail (robust z-score above ``z / 2``). Ties are all but impossible among trained float32 weights; several
  weights sharing one extreme or tail value are the signature of clamping to a bound (a layer's min or max, or a
  bound inside its range as AdvParams uses). In a small layer a pile also inflates the MAD, so that its values need
  not stand out by z-score at all (20 of LeNet-5's 150 conv1 weights set to the max: none above z = 4).

Exact zeros are left out of the statistics and never flagged (they are pruned or withheld weights, e.g. in the
``shield`` magnitude variant's copy: not perturbations), and a layer with fewer than ``min_weights`` non-zero
values is skipped. Flagged weights are reset (``reset``): ``zero``, or the layer's ``median`` (of its non-zero
weights). No data and no training: one cell per threshold (``z=4``, ``z=6``, …), budget ``(0.0, 0)`` (the scratch
baseline is an untrained model). ``extra`` reports how many weights were reset, in all and per layer.

Applicable to every protector whose stolen copy holds trained weights (``needs_weights``); n/a for whole-model
encryption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import Attack, Loot, Outcome, ThiefContext
from .registry_instance import attacks

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
RESETS = ("zero", "median")
#: a normal distribution's σ is 1.4826 × its MAD
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class InspectParams:
    z: list = field(default_factory=lambda: [4.0, 6.0, 8.0])
    reset: str = "zero"
    pile: int = 3
    min_weights: int = 16

    def validate(self) -> None:
        if not self.z or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.z):
            raise ValueError(f"parameter 'z' must be a non-empty list of positive numbers, got {self.z!r}")
        if self.reset not in RESETS:
            raise ValueError(f"parameter 'reset' must be one of {', '.join(RESETS)}, got {self.reset!r}")
        if self.pile < 2:
            raise ValueError(f"parameter 'pile' must be >= 2 (exact repeats that count as clamping), got {self.pile}")
        if self.min_weights < 2:
            raise ValueError(f"parameter 'min_weights' must be >= 2, got {self.min_weights}")


def suspicious(w: torch.Tensor, z: float, pile: int, min_weights: int) -> tuple[torch.Tensor, float]:
    """A mask of ``w``'s flagged values (outliers and clamp piles), and the layer's median of non-zero values."""
    flat = w.detach().reshape(-1).double()
    nonzero = flat[flat != 0]
    none = torch.zeros_like(flat, dtype=torch.bool).view_as(w)
    if len(nonzero) < min_weights:
        return none, 0.0
    med = nonzero.median()
    scale = MAD_TO_SIGMA * (nonzero - med).abs().median()
    if scale <= 0:
        return none, float(med)
    score = (flat - med).abs() / scale
    flagged = score > z
    values, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
    extreme = (flat == nonzero.max()) | (flat == nonzero.min())
    piled = (counts[inverse] >= pile) & ((score > z / 2) | extreme)
    return ((flagged | piled) & (flat != 0)).view_as(w), float(med)


@attacks.register()
class WeightInspection(Attack):
    """Reset statistical outliers and clamp piles in every conv/linear weight (see the module docstring)."""

    name = "weight-inspection"
    Params = InspectParams
    needs_weights = True

    def cells(self) -> list[str]:
        return [f"z={v:g}" for v in self.params.z]

    @torch.no_grad()
    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        z = float(cell.removeprefix("z="))
        model = loot.stolen_model()
        per_layer: dict[str, int] = {}
        for name, m in model.named_modules():
            if not isinstance(m, LAYERS):
                continue
            mask, med = suspicious(m.weight, z, self.params.pile, self.params.min_weights)
            n = int(mask.sum())
            if n:
                m.weight[mask] = 0.0 if self.params.reset == "zero" else med
                per_layer[name] = n
        return Outcome(cell, model.eval(), (0.0, 0),
                       extra={"reset_weights": sum(per_layer.values()), "reset_per_layer": per_layer,
                              "reset": self.params.reset})
