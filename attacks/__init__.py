"""Attacks on stolen, protected models; see :mod:`attacks.base` for the threat model.

Built-ins are imported here so their names are always registered; third-party attacks register through the
``edgepro_bench.attacks`` entry-point group.
"""

from . import distill, finetune, guess, inspect_weights, keyrecovery, prune, rescale  # noqa: F401  (registers the built-ins)
from .base import Attack, Grants, Loot, Oracle, Outcome, PlotSpec, ThiefContext
from .registry_instance import attacks


def get(name: str, **params) -> Attack:
    return attacks.get(name)(**params)


__all__ = ["Attack", "Grants", "Loot", "Oracle", "Outcome", "PlotSpec", "ThiefContext", "attacks", "get"]
