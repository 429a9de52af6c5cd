"""``query-distill``: the thief owns the device, so it queries the authorized model and distills its answers.

The run grants an oracle on the authorized deployment (:class:`~attacks.base.Oracle`: labels or probabilities, a
counted query budget) and possibly an unlabeled pool. The thief sends inputs it holds and trains a student on the
answers, starting either from a fresh model (``fresh``: the architecture with the thief's own random init) or from
the stolen copy (``stolen``).

What is queried, in this order, until the budget runs out:

- ``probs`` rows: the thief's labeled training split (a seeded order; the validation split is not queried: it
  only scores). Each labeled sample's target is then
  ``(1 - oracle_weight) · one-hot(true label) + oracle_weight · device probabilities`` (Hinton's distillation loss
  mixes the two terms the same way; soft cross-entropy is linear in its target). ``labels`` rows do not query
  labeled data: a device label adds nothing to the true label the thief already holds.
- the unlabeled pool (a seeded order): its target is the device's answer (one-hot of its label, or its
  probabilities). Pool samples beyond the budget are not used.

Training is the thief's recipe (:mod:`attacks.recipe`: train/validation split, learning-rate grid, early stopping),
with one difference that :func:`attacks.recipe.fit` cannot express: the queried pool samples are training
data only. ``recipe.fit`` splits every sample it gets into train and validation by label, so a pool sample with a
device label would land in validation and model selection would measure agreement with the device, not accuracy.
:func:`distill_fit` therefore runs the recipe's loop itself, with its fields (``optimizer``, ``lrs``,
``max_epochs``, ``patience``, ``batch_size``, ...), its optimizer and batching, its split
(:func:`attacks.recipe.split`, on the thief's labeled data only) and its evaluation
(:func:`attacks.recipe.evaluate`: true-label accuracy on the thief's labeled validation split); the loss is soft
cross-entropy against each sample's target distribution.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from protectors.core.seeding import stream_seed, torch_generator

from .base import Attack, Loot, Oracle, Outcome, PlotSpec, ThiefContext
from .finetune import check_fractions
from .recipe import Fit, ThiefRecipe, fit_split, split
from .registry_instance import attacks

INITS = ("fresh", "stolen")
OUTPUTS = Oracle.OUTPUTS
#: inputs per oracle call (the device answers in batches; the budget counts inputs)
QUERY_BATCH = 1024


@dataclass(frozen=True)
class DistillParams:
    #: the thief's labeled fraction(s) of the training set
    fractions: list = field(default_factory=lambda: [0.05])
    #: the student's starting point: ``fresh`` (the thief's random init) and/or ``stolen`` (the stolen copy)
    inits: list = field(default_factory=lambda: list(INITS))
    #: what the rows distill: device ``labels`` and/or ``probs`` (a row the run's oracle cannot answer is n/a)
    outputs: list = field(default_factory=lambda: list(OUTPUTS))
    #: weight of the device's probabilities in a labeled sample's target (``probs`` rows)
    oracle_weight: float = 0.5
    #: ask the recipe for fewer epochs (``None``: the recipe's ``max_epochs``)
    max_epochs: int | None = None

    def validate(self) -> None:
        check_fractions(list(self.fractions))
        for name, allowed in (("inits", INITS), ("outputs", OUTPUTS)):
            values = list(getattr(self, name))
            if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
                raise ValueError(f"parameter '{name}' must be a non-empty list of distinct values from "
                                 f"{', '.join(allowed)}, got {values!r}")
        if not 0 <= self.oracle_weight <= 1:
            raise ValueError(f"parameter 'oracle_weight' must be in [0, 1], got {self.oracle_weight}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"parameter 'max_epochs' must be >= 1 when given, got {self.max_epochs}")


def parse_cell(cell: str) -> tuple[str, str, float]:
    """``"stolen/probs/f=0.05"`` -> ``("stolen", "probs", 0.05)``."""
    init, output, f = cell.split("/")
    return init, output, float(f.removeprefix("f="))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution per sample (KL divergence to it plus a constant; cross-entropy when the
    targets are one-hot)."""
    return -(targets * F.log_softmax(logits, 1)).sum(1).mean()


def as_targets(answer: torch.Tensor, output: str, num_classes: int) -> torch.Tensor:
    """The device's answer as a target distribution for a ``labels`` or ``probs`` row (a ``labels`` row of a run
    that grants probabilities uses only their argmax)."""
    if not answer.is_floating_point():
        return F.one_hot(answer.long(), num_classes).float()
    if output == "labels":
        return F.one_hot(answer.argmax(1), num_classes).float()
    return answer.float()


def ask(oracle: Oracle, x: torch.Tensor) -> torch.Tensor:
    """The device's answers to ``x`` (in batches of :data:`QUERY_BATCH`; ``len(x)`` must be within the budget)."""
    return torch.cat([oracle(x[i : i + QUERY_BATCH]) for i in range(0, len(x), QUERY_BATCH)])


def distill_fit(init: Callable[[], nn.Module], train_x: torch.Tensor, train_t: torch.Tensor, vx: torch.Tensor,
                vy: torch.Tensor, recipe: ThiefRecipe, seed: int) -> Fit:
    """The recipe (:func:`attacks.recipe.fit_split`) on training inputs ``train_x`` with a target distribution each
    (``train_t``, soft cross-entropy) and a labeled validation split ``(vx, vy)`` (selection on true-label
    accuracy)."""
    return fit_split(init, train_x, train_t, vx, vy, recipe, seed,
                     loss_fn=lambda m, xb, tb: soft_cross_entropy(m(xb), tb), stream="thief/distill-shuffle")


@attacks.register()
class QueryDistill(Attack):
    """Distill the authorized device's answers (labels or probabilities) on the thief's inputs into a fresh model
    or the stolen copy, with the thief's training recipe."""

    name = "query-distill"
    Params = DistillParams

    def cells(self) -> list[str]:
        p = self.params
        return [f"{i}/{o}/f={f:g}" for f in p.fractions for i in p.inits for o in p.outputs]

    def needs_oracle(self, cell: str | None = None) -> str | None:
        if cell is None:  # the least any row needs
            return "labels" if "labels" in self.params.outputs else "probs"
        return parse_cell(cell)[1]

    def plot(self, cell: str) -> PlotSpec:
        init, output, fraction = parse_cell(cell)
        return PlotSpec(figure="query-distill", title="Query distillation vs scratch", style="budget",
                        xlabel="thief's labeled fraction of training set", x=fraction, xscale="log",
                        series=f"{init}/{output}")

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        init_kind, output, fraction = parse_cell(cell)
        oracle = ctx.oracle
        if oracle is None:
            raise RuntimeError(f"{self.name} {cell}: the run grants no oracle (not_applicable should have said so)")
        if output == "probs" and oracle.output != "probs":
            raise RuntimeError(f"{self.name} {cell}: the oracle answers {oracle.output}, not probabilities")
        before = oracle.used
        recipe = ctx.recipe
        if self.params.max_epochs is not None:
            recipe = recipe.with_(max_epochs=self.params.max_epochs)
        x, y = ctx.thief_data(fraction, ctx.seed)
        # the recipe's own split of the labeled data: validation scores true labels and is never queried
        tr, _, va, _ = split(torch.arange(len(y)), y, recipe.val_fraction, ctx.seed)
        num_classes = ctx.num_classes
        train_x, train_t = x[tr], F.one_hot(y[tr].long(), num_classes).float()

        queried_labeled = 0
        if output == "probs" and self.params.oracle_weight > 0:
            gen = torch_generator(stream_seed(ctx.seed, "thief/distill-labeled-order"))
            idx = torch.randperm(len(train_x), generator=gen)[: max(0, oracle.remaining)]
            if len(idx):
                w = self.params.oracle_weight
                answer = as_targets(ask(oracle, train_x[idx]), output, num_classes)
                train_t[idx] = (1 - w) * train_t[idx] + w * answer
            queried_labeled = len(idx)

        pool = ctx.unlabeled_pool(ctx.seed) if ctx.unlabeled_pool is not None else x[:0]
        gen = torch_generator(stream_seed(ctx.seed, "thief/distill-pool-order"))
        pool_x = pool[torch.randperm(len(pool), generator=gen)[: max(0, oracle.remaining)]]
        if len(pool_x):
            train_x = torch.cat([train_x, pool_x])
            train_t = torch.cat([train_t, as_targets(ask(oracle, pool_x), output, num_classes)])

        if init_kind == "stolen":
            start = loot.stolen_model()
            for p in start.parameters():
                p.requires_grad_(True)

            def init() -> nn.Module:
                return copy.deepcopy(start)
        else:
            init = loot.model_factory

        fit = distill_fit(init, train_x, train_t, x[va], y[va], recipe, ctx.seed)
        extra = {"queries": oracle.used - before, "queried_labeled": queried_labeled, "queried_pool": len(pool_x),
                 "pool": len(pool), "oracle_output": oracle.output, "lr": fit.lr, "epoch": fit.epoch,
                 "epochs_run": fit.epochs_run, "val_samples": fit.val_samples}
        return Outcome(cell, fit.model, (fraction, fit.epochs_run), extra=extra, val_acc=fit.val_acc)
