"""The attack interface and the thief's context.

Threat model. The thief copied the device storage: the artifact's files (weights and encrypted blobs), not the key
held by the device's secure element. The thief knows the architecture and the protection method (Kerckhoffs's
principle), holds a labeled fraction ``f`` of the training set, and has a compute budget in epochs. What stealing is
worth is always measured against *scratch*: the same architecture trained from random initialization on the same
data with the same budget (``gain = stolen_acc_after - scratch_acc``).

An attack receives what the thief holds (:class:`Loot`) and a :class:`ThiefContext`, and returns one
:class:`Outcome` per parameter cell. It never sees the key: the harness alone uses it, afterwards, to ask whether
the password still works on the attacked copy (``auth_acc_after``).

An attack also declares how the report shows its rows (the harness reads the declaration, never the attack's name):
:meth:`Attack.plot` (which figure a row belongs to and where on its horizontal axis), :meth:`Attack.derived` (numbers
computed from its own ``extra`` once the harness knows the clean accuracy, as lm-eval's metrics declare their
aggregation) and ``report_table``/``report_columns`` (a table of its own, e.g. the guessing statistics). The runner
records :meth:`Attack.declaration` in every attack cell's record.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from protectors.core.artifact import Artifact
from protectors.core.base import Configurable, ModelFactory, Protector, Trainer
from protectors.core.pruning import Pruned


@dataclasses.dataclass
class Loot:
    """What the thief copied: the artifact, and the protector (the method is public)."""

    artifact: Artifact
    protector: Protector
    model_factory: ModelFactory

    def stolen_model(self) -> nn.Module:
        return self.protector.stolen(self.artifact, self.model_factory)


@dataclasses.dataclass
class ThiefContext:
    """The thief's resources: a trainer, a labeled subset maker, a loader, the test set to score on, a seed."""

    trainer: Trainer
    thief_data: Callable[[float, int], tuple[torch.Tensor, torch.Tensor]]
    loader: Callable[[torch.Tensor, torch.Tensor, int], Any]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    lock_sites: tuple[str, ...]
    seed: int

    def evaluate(self, model: nn.Module) -> float:
        return self.trainer.evaluate(model, self.test_x, self.test_y)


#: how a figure draws the rows of the attacks that declare it (see :class:`PlotSpec`)
PLOT_STYLES = {
    "sweep": "one panel per attack and (dataset, model): stolen accuracy after the attack (and authorized, for "
             "protectors with a secret) against x, one line per protector and series",
    "budget": "one panel per (dataset, model): stolen accuracy after the attack against the thief's budget x, one "
              "line per protector, beside the scratch baseline",
    "curve": "one line per (dataset, model, protector, attack): the running best of the accuracies the record lists "
             "in extra[curve], against their count",
}


@dataclasses.dataclass(frozen=True)
class PlotSpec:
    """Where one row (cell) of an attack goes in the report's plots; recorded in the attack cell's record.

    Attacks that declare the same ``figure`` share one plot file (``plots/<figure>.png``) and one REPORT.md section
    titled ``title``; ``style`` (one of :data:`PLOT_STYLES`) says how it is drawn. ``x`` is this row's position on
    the horizontal axis (``xlabel``, ``xscale``), ``series`` which line of its protector it belongs to (a non-empty
    series is drawn dashed: e.g. ``"+ft"``), ``curve`` the ``extra`` field that lists one accuracy per step.
    """

    figure: str
    title: str
    style: str
    xlabel: str
    x: float | None = None
    xscale: str = "linear"
    series: str = ""
    curve: str | None = None

    def __post_init__(self):
        if self.style not in PLOT_STYLES:
            raise ValueError(f"plot style {self.style!r}: allowed {', '.join(PLOT_STYLES)}")
        if self.xscale not in ("linear", "log"):
            raise ValueError(f"plot xscale {self.xscale!r}: allowed linear, log")
        if (self.style == "curve") != (self.curve is not None):
            raise ValueError("a plot of style 'curve' names its extra field in 'curve' (and only that style does)")
        if self.style != "curve" and self.x is None:
            raise ValueError(f"a plot of style {self.style!r} needs the row's x")


def pass_counts(accs: Any, clean_acc: float) -> dict[str, int]:
    """How many of ``accs`` (one accuracy per guess) reach 50% and 80% of the clean accuracy."""
    a = np.asarray(accs, dtype=float)
    return {"n_pass50": int((a >= 0.5 * clean_acc).sum()), "n_pass80": int((a >= 0.8 * clean_acc).sum())}


@dataclasses.dataclass
class Outcome:
    """One row of an attack: its parameter, the attacked model, and the thief's budget for the scratch baseline.

    ``model`` is what the thief ends with (scored as ``stolen_acc_after``; the harness also applies the true secret
    to it for ``auth_acc_after``). ``budget`` is ``(fraction, epochs)``: the thief data and training epochs the
    attack used, which the scratch baseline gets too (``epochs = 0``: an untrained model). ``extra`` holds
    attack-specific numbers.
    """

    param: str
    model: nn.Module | None
    budget: tuple[float, int]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: which output channels of which modules survived structured pruning (to slice a per-neuron secret)
    pruned: Pruned | None = None
    #: the attacker's guess of the secret, compared with the real one by the harness (reporting only)
    guess: Any = None
    #: the learning rate the attack trained with, when not the training config's: the scratch baseline uses it too
    lr: float | None = None


class Attack(Configurable, ABC):
    """Base class of attacks. Subclasses set ``name``, ``Params`` and what they need of a protector.

    An attack states what it needs (ART's ``_estimator_requirements``), a protector states what it has
    (:class:`~protectors.core.base.Protector`'s declarations); the harness never compares names.
    """

    kind = "attack"
    #: secret kinds this attack applies to (``None``: every kind)
    secret_kinds: ClassVar[tuple[str, ...] | None] = None
    #: whether the thief's copy must hold trained weights (data-free weight inspection)
    needs_weights: ClassVar[bool] = False

    def not_applicable(self, protector: Protector, artifact: Artifact) -> str | None:
        """Why this attack does not apply to ``protector`` (shown in the table), or ``None`` if it does."""
        if self.secret_kinds is not None and protector.secret_kind not in self.secret_kinds:
            return (f"n/a: {self.name} needs a secret of kind {' or '.join(self.secret_kinds)}; "
                    f"{protector.name}'s is {protector.secret_kind}")
        if self.needs_weights and not protector.holds_weights:
            return f"n/a: {self.name} needs trained weights in the stolen copy; {protector.name}'s holds none"
        return None

    def cells(self) -> list[str]:
        """Parameter labels of the rows this attack produces (one record each)."""
        return ["-"]

    # -- what the report shows (declared, recorded with every cell) ----------------------------------------------
    #: a report table of this attack's own (``tables/<report_table>.*``: its rows with ``report_columns``), or None
    report_table: ClassVar[str | None] = None
    #: the ``extra`` fields (or fields of the harness's secret comparison) that table shows
    report_columns: ClassVar[tuple[str, ...]] = ()
    #: of those, the ones that are counts (shown as whole numbers)
    count_columns: ClassVar[tuple[str, ...]] = ()

    def plot(self, cell: str) -> PlotSpec | None:
        """Where the row labelled ``cell`` goes in the report's plots (``None``: in no plot of its own)."""
        return None

    def derived(self, extra: dict[str, Any], clean_acc: float) -> dict[str, Any]:
        """Numbers the harness adds to a row's ``extra``, computed from the attack's own ``extra`` and the clean
        model's accuracy (which the attack never sees); none by default."""
        return {}

    def declaration(self, cell: str) -> dict[str, Any]:
        """What the report needs to know about the row labelled ``cell``, as recorded in its record."""
        plot = self.plot(cell)
        return {"plot": dataclasses.asdict(plot) if plot is not None else None, "table": self.report_table,
                "columns": list(self.report_columns), "counts": list(self.count_columns)}

    @abstractmethod
    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        """Attack the stolen copy with the parameter labelled ``cell`` (one of :meth:`cells`)."""
