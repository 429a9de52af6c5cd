"""Authentication is a template method of the Protector base class: no plugin, mixin or not, can skip it."""

import pytest
import torch

import protectors
from bench import models
from protectors.core.base import TEMPLATE_METHODS, Protector, latency_context
from protectors.core.errors import KeyMaterialError
from protectors.core.weights import WEIGHTS, load_weights, state_bytes

KEY, OTHER = bytes(range(32)), bytes(range(1, 33))


class _Plain(Protector):
    name = "plain-test"
    secret_kind = "withheld-weights"

    def _protect(self, model, ctx, key):
        artifact = self.new_artifact(model, key)
        artifact.put(WEIGHTS, state_bytes(model))
        artifact.put_encrypted("secret.enc", bytes(16), key)
        return artifact

    def _stolen(self, artifact, model_factory):
        return model_factory().eval()

    def _authorize(self, model, artifact, key, pruned=None):
        return None


class _DeployMixin:
    def _deploy(self, artifact, key, model_factory, mode=None):
        return load_weights(artifact, model_factory)


@pytest.mark.parametrize("name", TEMPLATE_METHODS)
def test_a_mixin_that_redefines_a_public_entry_point_is_refused(name):
    mixin = type("Mixin", (), {name: lambda self, *a, **k: None})
    with pytest.raises(TypeError, match=f"defines {name!r}.*write _{name}"):
        type("Bypass", (mixin, _Plain), {"name": "bypass"})


def test_a_deploy_inherited_from_a_mixin_still_authenticates():
    cls = type("Mixed", (_DeployMixin, _Plain), {"name": "mixed-test"})
    factory = models.factory("lenet5", 1, 8, 10, seed=0)
    protector = cls()
    artifact = protector.protect(factory(), latency_context(factory, torch.zeros(1, 1, 8, 8), 10, 1), KEY)
    assert isinstance(protector.deploy(artifact, KEY, factory), torch.nn.Module)
    with pytest.raises(KeyMaterialError):
        protector.deploy(artifact, OTHER, factory)


def test_every_registered_protector_writes_the_underscored_methods():
    for name in protectors.protectors.names():
        try:
            cls = protectors.protectors.get(name)
        except protectors.UnknownNameError:
            continue
        for method in TEMPLATE_METHODS:
            assert getattr(cls, method) is getattr(Protector, method), (name, method)


def test_the_default_onnx_load_authenticates_like_deploy(tmp_path):
    """The base class's own ONNX build and load (he-paillier and the example plugin use them) go through the key
    check: a wrong key, or a graph swapped in from another genuine artifact, is refused."""
    from protectors.core.artifact import Artifact
    from protectors.core.errors import ArtifactError
    from protectors.core.onnx_runtime import SEALED

    cls = type("Onnxed", (_DeployMixin, _Plain), {"name": "onnxed-test"})
    factory = models.factory("lenet5", 1, 8, 10, seed=0)
    example = torch.zeros(1, 1, 8, 8)
    protector, built = cls(), []
    for i in range(2):
        artifact = protector.protect(factory(), latency_context(factory, example, 10, i), KEY)
        protector.onnx_build(artifact, KEY, factory, "default", example)
        artifact.seal(KEY)
        artifact.save(tmp_path / str(i))
        built.append(tmp_path / str(i))
    run = protector.onnx_load(Artifact.load(built[0]), KEY, "default")
    assert run(example.numpy()).shape == (1, 10)
    with pytest.raises(KeyMaterialError):
        protector.onnx_load(Artifact.load(built[0]), OTHER, "default")
    (built[0] / SEALED).write_bytes((built[1] / SEALED).read_bytes())
    with pytest.raises(ArtifactError):
        protector.onnx_load(Artifact.load(built[0]), KEY, "default")
