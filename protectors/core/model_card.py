"""The model card: what a model architecture declares to protectors and to the profiler.

A model registered with the harness comes with a frozen :class:`ModelCard` (its input shape, classes, default lock
sites, and the layers a lock at a site can be folded into). Protectors never import the harness: they read the card
of the factory they are given (:func:`card_of`), not attributes patched onto modules.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class ModelCard:
    """One architecture at one input size: its shape, classes, lock sites and foldable producers."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    #: named modules at every hidden activation: the default lock sites
    lock_sites: tuple[str, ...] = ()
    #: (site, producer) pairs: a lock at ``site`` can be folded into the layer ``producer`` before it
    fold_producers: tuple[tuple[str, str], ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def producers(self) -> dict[str, str]:
        return dict(self.fold_producers)

    def spec(self) -> dict[str, Any]:
        """How to rebuild the model (written in an artifact's public metadata)."""
        return {"name": self.name, "in_channels": self.in_channels, "image_size": self.image_size,
                "num_classes": self.num_classes}


_CARDS: weakref.WeakKeyDictionary[nn.Module, ModelCard] = weakref.WeakKeyDictionary()


class CardedFactory:
    """A zero-argument model builder that carries its model's card (and tells each model it builds its card)."""

    def __init__(self, build: Callable[[], nn.Module], card: ModelCard):
        self.build, self.card = build, card

    def __call__(self) -> nn.Module:
        model = self.build()
        _CARDS[model] = self.card
        return model


def card_of(obj: Any) -> ModelCard | None:
    """The card of a :class:`CardedFactory` or of a model one built; ``None`` for anything else (a plain callable,
    a model built elsewhere): then there are no declared lock sites and nothing can be folded."""
    if isinstance(obj, CardedFactory):
        return obj.card
    if isinstance(obj, nn.Module):
        return _CARDS.get(obj)
    return None
