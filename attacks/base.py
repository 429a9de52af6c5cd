"""The attack interface and the thief's context.

Threat model. The thief copied the device storage: the artifact's files (weights and encrypted blobs), not the key
held by the device's secure element. The thief knows the architecture and the protection method (Kerckhoffs's
principle), holds a labeled fraction ``f`` of the training set, and has a compute budget in epochs. What stealing is
worth is always measured against *scratch*: the same architecture trained from random initialization on the same
data with the same budget (``gain = stolen_acc_after - scratch_acc``).

An attack receives what the thief holds (:class:`Loot`) and a :class:`ThiefContext`, and returns one
:class:`Outcome` per parameter cell. It never sees the key: the harness alone uses it, afterwards, to ask whether
the password still works on the attacked copy (``auth_acc_after``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

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

    @abstractmethod
    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        """Attack the stolen copy with the parameter labelled ``cell`` (one of :meth:`cells`)."""
