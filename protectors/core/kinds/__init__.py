"""Secret kinds: one module per kind of secret a protector may hold.

A kind owns its secret's format, its public metadata schema (:func:`check_public_meta`, enforced when an artifact is
sealed) and the helpers that protectors and attacks of that kind share. Attacks import kinds, never protectors, so a
third-party protector that declares a kind gets every attack of that kind.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import neuron_mask, neuron_sign, weight_patch

#: kind name → the module that owns it (kinds with no shared format or helpers have no module)
MODULES: dict[str, ModuleType] = {neuron_mask.KIND: neuron_mask, neuron_sign.KIND: neuron_sign,
                                  weight_patch.KIND: weight_patch}


def check_public_meta(kind: str, meta: dict[str, Any]) -> None:
    """Check an artifact's plaintext metadata against its kind's schema; ``ValueError`` names the field."""
    module = MODULES.get(kind)
    if module is not None:
        module.check_public_meta(meta)
