"""``none``: the model is deployed as it is. The baseline for accuracy and latency."""

from __future__ import annotations

from torch import nn

from .core import onnx_runtime
from .core.artifact import Artifact
from .core.base import PluginContext, Protector
from .core.registry_instance import protectors
from .core.weights import WEIGHTS, load_weights, state_bytes

ONNX = "model.onnx"


@protectors.register()
class NoProtection(Protector):
    """No protection: plaintext weights; the thief runs exactly what the device runs."""

    name = "none"
    secret_kind = "none"

    def _protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        artifact = self.new_artifact(model, key)
        artifact.put(WEIGHTS, state_bytes(model))
        return artifact

    def _deploy(self, artifact, key, model_factory, mode=None):
        self.check_mode(mode)
        return load_weights(artifact, model_factory)

    def _stolen(self, artifact, model_factory):
        return load_weights(artifact, model_factory)

    def _authorize(self, model, artifact, key, pruned=None):
        return model

    def _onnx_build(self, artifact, key, model_factory, mode, example):
        artifact.put(ONNX, onnx_runtime.export(load_weights(artifact, model_factory), example))

    def _onnx_load(self, artifact, key, mode, threads=1):
        return onnx_runtime.bound(onnx_runtime.session(artifact.file(ONNX), threads))
