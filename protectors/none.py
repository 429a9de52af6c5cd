"""``none``: the model is deployed as it is. The baseline for accuracy and latency."""

from __future__ import annotations

from torch import nn

from .artifact import Artifact, new_meta
from .base import ModelFactory, PluginContext, Protector
from .hashing import sha256_hex
from .registry_instance import protectors
from .weights import load_state_bytes, state_bytes

WEIGHTS = "weights.safetensors"


def model_spec(model: nn.Module) -> dict:
    return dict(getattr(model, "spec", {}) or {"class": type(model).__name__})


@protectors.register()
class NoProtection(Protector):
    """No protection: plaintext weights; the thief runs exactly what the device runs."""

    name = "none"

    def protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        weights = state_bytes(model)
        meta = new_meta(self.name, self.param_dict(), model_spec(model),
                        files=[WEIGHTS], sha256={WEIGHTS: sha256_hex(weights)})
        return Artifact(meta, {WEIGHTS: weights})

    def _load(self, artifact: Artifact, model_factory: ModelFactory) -> nn.Module:
        self.check_artifact(artifact)
        artifact.check_hashes()
        model = load_state_bytes(model_factory(), artifact.file(WEIGHTS), f"{artifact.where}/{WEIGHTS}")
        return model.eval()

    def deploy(self, artifact, key, model_factory, mode=None):
        self.check_mode(mode)
        return self._load(artifact, model_factory)

    def stolen(self, artifact, model_factory):
        return self._load(artifact, model_factory)

    def authorize(self, model, artifact, key, kept=None):
        return model
