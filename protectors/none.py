"""``none``: the model is deployed as it is. The baseline for accuracy and latency."""

from __future__ import annotations

from torch import nn

from . import onnx_runtime
from .artifact import Artifact
from .base import ModelFactory, PluginContext, Protector
from .registry_instance import protectors
from .weights import load_state_bytes, state_bytes

WEIGHTS = "weights.safetensors"
ONNX = "model.onnx"


def load_weights(artifact: Artifact, model_factory: ModelFactory, name: str = WEIGHTS) -> nn.Module:
    """The model with the artifact's plaintext weights file ``name`` loaded (eval mode)."""
    return load_state_bytes(model_factory(), artifact.file(name), f"{artifact.where}/{name}").eval()


@protectors.register()
class NoProtection(Protector):
    """No protection: plaintext weights; the thief runs exactly what the device runs."""

    name = "none"
    secret_kind = "none"

    def protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        artifact = self.new_artifact(model, key)
        artifact.put(WEIGHTS, state_bytes(model))
        return artifact

    def deploy(self, artifact, key, model_factory, mode=None):
        self.check_mode(mode)
        return load_weights(artifact, model_factory)

    def stolen(self, artifact, model_factory):
        return load_weights(artifact, model_factory)

    def authorize(self, model, artifact, key, pruned=None):
        return model

    def onnx_build(self, artifact, key, model_factory, mode, example):
        artifact.put(ONNX, onnx_runtime.export(load_weights(artifact, model_factory), example))

    def onnx_load(self, artifact, key, mode, threads=1):
        return onnx_runtime.bound(onnx_runtime.session(artifact.file(ONNX), threads))
