"""``finetune``: the thief fine-tunes the stolen copy on a labeled fraction of the training set.

Fine-tuning uses the thief's recipe (:mod:`attacks.recipe`: a learning-rate grid, early stopping and selection on the
thief's own validation split). The scratch baseline (same architecture, random init, same data, the same recipe) is
computed by the harness for every row, so ``gain`` says what the stolen weights are worth over the thief's own data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from .base import Attack, Loot, Outcome, PlotSpec, ThiefContext
from .recipe import Fit
from .registry_instance import attacks


def check_fractions(fractions: list) -> None:
    if not fractions or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in fractions):
        raise ValueError(f"parameter 'fractions' must be a non-empty list of numbers in (0, 1], got {fractions!r}")


@dataclass(frozen=True)
class FinetuneParams:
    fractions: list = field(default_factory=lambda: [0.01, 0.05, 0.10])
    #: at most this many epochs per learning rate (``None``: the recipe's ``max_epochs``): an attack asking for less
    epochs: int | None = None
    #: one learning rate instead of the recipe's grid
    lr: float | None = None

    def validate(self) -> None:
        check_fractions(list(self.fractions))
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"parameter 'epochs' must be >= 1, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"parameter 'lr' must be > 0, got {self.lr}")


def finetune(model: nn.Module, ctx: ThiefContext, fraction: float, epochs: int | None = None,
             lr: float | None = None) -> Fit:
    """Fine-tune (a copy of) ``model`` with the thief's recipe on its stratified ``fraction`` of the training set;
    ``epochs`` caps the epochs per learning rate and ``lr`` replaces the grid (an attack asking for less)."""
    x, y = ctx.thief_data(fraction, ctx.seed)
    less = {**({"max_epochs": epochs} if epochs else {}),
            **({"lrs": [lr]} if lr else {})}
    return ctx.fit(lambda: copy.deepcopy(model), x, y, **less)


@attacks.register()
class Finetune(Attack):
    """Fine-tune the stolen copy with the thief's data and budget (the optimizer of scratch training by default)."""

    name = "finetune"
    Params = FinetuneParams

    def cells(self) -> list[str]:
        return [f"f={f:g}" for f in self.params.fractions]

    def plot(self, cell: str) -> PlotSpec:
        return PlotSpec(figure="finetune", title="Fine-tuning vs scratch", style="budget",
                        xlabel="thief's labeled fraction of training set", x=float(cell.removeprefix("f=")),
                        xscale="log")

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        fraction = float(cell.removeprefix("f="))
        p = self.params
        fit = finetune(loot.stolen_model(), ctx, fraction, p.epochs, p.lr)
        return Outcome(cell, fit.model, (fraction, fit.epochs_run), val_acc=fit.val_acc,
                       extra={"lr": fit.lr, "epoch": fit.epoch})
