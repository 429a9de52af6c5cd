"""``finetune``: the thief fine-tunes the stolen copy on a labeled fraction of the training set.

The scratch baseline (same architecture, random init, same subset, same epochs and optimizer) is computed by the
harness for every row, so ``gain`` says what the stolen weights are worth over the thief's own data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Attack, Loot, Outcome, PlotSpec, ThiefContext
from .registry_instance import attacks


def _fractions_ok(fractions: list) -> None:
    if not fractions or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in fractions):
        raise ValueError(f"parameter 'fractions' must be a non-empty list of numbers in (0, 1], got {fractions!r}")


@dataclass(frozen=True)
class FinetuneParams:
    fractions: list = field(default_factory=lambda: [0.01, 0.05, 0.10])
    epochs: int = 10
    lr: float | None = None

    def validate(self) -> None:
        _fractions_ok(list(self.fractions))
        if self.epochs < 1:
            raise ValueError(f"parameter 'epochs' must be >= 1, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"parameter 'lr' must be > 0, got {self.lr}")


def finetune(model, ctx: ThiefContext, fraction: float, epochs: int, lr: float | None = None, desc: str = "thief"):
    """Train ``model`` on the thief's stratified ``fraction`` of the training set (seeded by ``ctx.seed``)."""
    x, y = ctx.thief_data(fraction, ctx.seed)
    return ctx.trainer.fit(model, ctx.loader(x, y, ctx.seed), epochs=epochs, lr=lr, desc=desc)


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
        model = finetune(loot.stolen_model(), ctx, fraction, p.epochs, p.lr, desc=f"finetune {cell}")
        return Outcome(cell, model, (fraction, self.params.epochs), lr=p.lr)
