"""Protectors: turn a trained model into a deployable artifact plus a secret key.

Built-ins are imported here so their names are always registered; third-party protectors register through the
``edgepro_bench.protectors`` entry-point group (see the README, "Writing a protector plugin").
"""

from . import aes, edgepro, he_paillier, hpnn, nnsplitter, none, shield  # noqa: F401  (registers the built-ins and peers)
from .artifact import Artifact
from .base import SECRET_KINDS, PluginContext, Protector, latency_context
from .errors import ArtifactError, BenchError, ConfigError, DataError, KeyMaterialError, UnknownNameError
from .onnx_runtime import NotSupported
from .pruning import Pruned
from .registry import Registry
from .registry_instance import protectors


def get(name: str, **params) -> Protector:
    """Instantiate the protector registered as ``name`` with ``params``."""
    return protectors.get(name)(**params)


__all__ = ["SECRET_KINDS", "Artifact", "ArtifactError", "BenchError", "ConfigError", "DataError", "KeyMaterialError",
           "NotSupported", "PluginContext", "Protector", "Pruned", "Registry", "UnknownNameError", "get",
           "latency_context", "protectors"]
