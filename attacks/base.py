"""The attack interface and the thief's context.

Threat model. The thief copied the device storage: the artifact's files (weights and encrypted blobs), not the key
held by the device's secure element, and it owns the device. The thief knows the architecture and the protection
method (Kerckhoffs's principle). Its budget is data: a labeled fraction ``f`` of the training set, optionally an
unlabeled pool and a number of queries to the authorized device (:class:`Grants`, config ``[thief]``).

The thief protocol:

- every training the thief does, scratch included, uses one recipe (:mod:`attacks.recipe`): a train/validation split
  of its own labeled data, a small learning-rate grid, early stopping and selection on its validation split
  (:meth:`ThiefContext.fit`); an attack may ask for less, never for more;
- what stealing is worth is always measured against *scratch*: the same architecture trained from the thief's own
  random initialization on the same labeled data with the same recipe (``gain = stolen_acc_after - scratch_acc``);
- an attack reports ``val_acc``, its own validation score of what it returns, so the strongest attack is chosen on
  the thief's side; the harness scores on the test set, which an attack never receives;
- queries go through a counted :class:`Oracle` on the authorized deployment, when the run grants one.

An attack receives what the thief holds (:class:`Loot`) and a :class:`ThiefContext`, and returns one
:class:`Outcome` per parameter cell. It never sees the key: the harness alone uses it, afterwards, to ask whether
the password still works on the attacked copy (``auth_acc_after``).

Isolation. The harness runs :meth:`Attack.run` in a process of its own (``bench.isolation``) that holds neither the
key, nor the clean model, nor the test set: the thief's data, pool and oracle answers come on request. So what an
attack returns must cross a process boundary without pickle: ``Outcome.model`` is the architecture (the model
factory's, structurally pruned or not) with at most :mod:`protectors.core.lock` masks at its sites, ``guess`` a
dataclass of :mod:`protectors.core.kinds`, ``extra`` JSON numbers.

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

from .recipe import Fit, ThiefRecipe, fit


@dataclasses.dataclass
class Loot:
    """What the thief copied: the artifact, and the protector (the method is public)."""

    artifact: Artifact
    protector: Protector
    model_factory: ModelFactory

    def stolen_model(self) -> nn.Module:
        return self.protector.stolen(self.artifact, self.model_factory)


class Oracle:
    """Counted queries to the authorized device the thief owns: it sends inputs, it gets outputs, nothing else.

    ``output`` is what the device answers: ``"labels"`` (the predicted class per input) or ``"probs"`` (the softmax
    probabilities). Every input counts against ``budget``; a query past it raises :class:`QueryBudgetExceeded`. The
    harness records :attr:`used` with the row.
    """

    OUTPUTS = ("labels", "probs")

    def __init__(self, answer: Callable[[torch.Tensor], torch.Tensor], budget: int, output: str = "labels"):
        if output not in self.OUTPUTS:
            raise ValueError(f"oracle output {output!r}: allowed {', '.join(self.OUTPUTS)}")
        self._answer, self.budget, self.output, self.used = answer, int(budget), output, 0

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if n > self.remaining:
            raise QueryBudgetExceeded(f"oracle: {n} queries asked, {self.remaining} of {self.budget} left")
        self.used += n
        with torch.no_grad():
            logits = self._answer(x)
        return logits.argmax(1) if self.output == "labels" else torch.softmax(logits, 1)


class QueryBudgetExceeded(RuntimeError):
    """An attack asked the oracle for more queries than the run grants."""


@dataclasses.dataclass(frozen=True)
class Grants:
    """What the run grants the thief beyond the stolen copy (config section ``[thief]``): an oracle on the
    authorized device (``oracle``: ``"none"``, ``"labels"`` or ``"probs"``, with a budget of ``queries`` inputs) and an
    unlabeled pool (``unlabeled``: a fraction of the training set, without its labels)."""

    oracle: str = "none"
    queries: int = 0
    unlabeled: float = 0.0

    def validate(self) -> None:
        if self.oracle not in ("none", *Oracle.OUTPUTS):
            raise ValueError(f"'oracle' must be one of none, {', '.join(Oracle.OUTPUTS)}, got {self.oracle!r}")
        if self.queries < 0:
            raise ValueError(f"'queries' must be >= 0, got {self.queries}")
        if not 0 <= self.unlabeled < 1:
            raise ValueError(f"'unlabeled' must be in [0, 1), got {self.unlabeled}")
        if self.oracle != "none" and self.queries < 1:
            raise ValueError(f"an oracle of {self.oracle} needs 'queries' >= 1")

    @property
    def has_oracle(self) -> bool:
        return self.oracle != "none" and self.queries > 0

    def key(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ThiefContext:
    """The thief's resources: its labeled data (a fraction of the training set), the training recipe every thief
    training uses (:mod:`attacks.recipe`), what the run grants (an oracle, an unlabeled pool), and its seed.

    The test set is not here: the harness scores what an attack returns. ``trainer`` and ``loader`` remain for
    attacks with optimisation loops of their own (mask and sign learning); ``evaluate`` scores on data the thief
    holds.
    """

    trainer: Trainer
    thief_data: Callable[[float, int], tuple[torch.Tensor, torch.Tensor]]
    loader: Callable[[torch.Tensor, torch.Tensor, int], Any]
    num_classes: int
    lock_sites: tuple[str, ...]
    seed: int
    recipe: ThiefRecipe = dataclasses.field(default_factory=ThiefRecipe)
    grants: Grants = dataclasses.field(default_factory=Grants)
    #: the counted oracle, when the run grants one
    oracle: Oracle | None = None
    #: ``unlabeled_pool(seed) -> x``: the unlabeled fraction the run grants (disjoint from the labeled data)
    unlabeled_pool: Callable[[int], torch.Tensor] | None = None

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy on data the thief holds (its own labeled data or validation split)."""
        return self.trainer.evaluate(model, x, y)

    def fit(self, init: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> Fit:
        """Train with the thief's recipe (selection on its own validation split); ``kwargs`` go to
        :func:`attacks.recipe.fit` (``loss_fn``, ``augment``) or, for recipe fields, ask for less
        (``lrs=[0.01]``, ``max_epochs=2``)."""
        fields = {f.name for f in dataclasses.fields(ThiefRecipe)}
        changes = {k: v for k, v in kwargs.items() if k in fields}
        rest = {k: v for k, v in kwargs.items() if k not in fields}
        recipe = self.recipe.with_(**changes) if changes else self.recipe
        return fit(init, x, y, recipe, self.seed, **rest)


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
    #: the thief's own validation accuracy of ``model`` (what a thief can use to pick its strongest attack), from
    #: :meth:`ThiefContext.fit` (``Fit.val_acc``) or the attack's own selection on thief data; ``None`` without data
    val_acc: float | None = None


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

    def needs_oracle(self, cell: str | None = None) -> str | None:
        """The oracle output this attack (or its row ``cell``) needs: ``"labels"``, ``"probs"``, or ``None``."""
        return None

    def not_applicable(self, protector: Protector, artifact: Artifact, grants: Grants | None = None,
                       cell: str | None = None) -> str | None:
        """Why this attack does not apply to ``protector`` under the run's ``grants`` (shown in the table), or
        ``None`` if it does."""
        if self.secret_kinds is not None and protector.secret_kind not in self.secret_kinds:
            return (f"n/a: {self.name} needs a secret of kind {' or '.join(self.secret_kinds)}; "
                    f"{protector.name}'s is {protector.secret_kind}")
        if self.needs_weights and not protector.holds_weights:
            return f"n/a: {self.name} needs trained weights in the stolen copy; {protector.name}'s holds none"
        need = self.needs_oracle(cell)
        if need is not None:
            grants = grants or Grants()
            if not grants.has_oracle:
                return f"n/a: {self.name} needs an oracle ({need}); the run grants none ([thief] oracle, queries)"
            if need == "probs" and grants.oracle != "probs":
                return f"n/a: {self.name} needs probabilities from the oracle; the run grants {grants.oracle}"
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
