"""Protectors: turn a trained model into a deployable artifact plus a secret key.

``protectors.core`` is the shared foundation (interface, artifacts, keys, secret kinds); every other module of this
package is one built-in protector, a plugin like any other. Built-ins are imported here so their names are always
registered; third-party protectors register through the ``edgepro_bench.protectors`` entry-point group (see the
README, "Writing a protector plugin").
"""

from . import aes, edgepro, he_paillier, hpnn, nnsplitter, none, shield  # noqa: F401  (registers the built-ins and peers)
from .core.artifact import Artifact
from .core.base import SECRET_KINDS, PluginContext, Protector, latency_context
from .core.errors import (
    ArtifactError,
    BenchError,
    ConfigError,
    DataError,
    KeyMaterialError,
    NotApplicable,
    UnknownNameError,
)
from .core.kinds.weight_patch import WeightPatch
from .core.model_card import ModelCard, card_of
from .core.onnx_runtime import NotSupported
from .core.plaintext import PlaintextWeightsProtector
from .core.pruning import Pruned
from .core.registry import Registry
from .core.registry_instance import protectors


def get(name: str, **params) -> Protector:
    """Instantiate the protector registered as ``name`` with ``params``."""
    return protectors.get(name)(**params)


__all__ = ["SECRET_KINDS", "Artifact", "ArtifactError", "BenchError", "ConfigError", "DataError", "KeyMaterialError",
           "ModelCard", "NotApplicable", "NotSupported", "PlaintextWeightsProtector", "PluginContext", "Protector",
           "Pruned", "Registry", "UnknownNameError", "WeightPatch", "card_of", "get", "latency_context", "protectors"]
