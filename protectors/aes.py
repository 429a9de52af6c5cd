"""``aes``: the whole serialized model encrypted with AES-256-GCM (the encryption baseline EdgePro is compared with).

Two deploy modes:

- ``load``: decrypt once when the model is loaded; plaintext weights then stay in memory.
- ``per-inference``: decrypt before every inference and wipe right after, so weights never stay in plaintext.

Both decrypt into one preallocated buffer whose bytes *are* the model's parameters (zero-copy safetensors views),
so no time goes to copies between bytes, NumPy and tensors. The thief holds only ciphertext: their model is the
architecture with random weights.

On ONNX Runtime, ``load`` decrypts the whole exported graph at load; ``per-inference`` exports the graph with every
weight a graph input (the file holds no weights) and feeds it NumPy views of the decryption buffer.
"""

from __future__ import annotations

import torch
from torch import nn

from .core import onnx_runtime
from .core.base import ModelFactory, PluginContext, Protector
from .core.crypto import GcmDecryptor, wipe_buffer
from .core.registry_instance import protectors
from .core.weights import bind_views, safetensors_views, state_bytes

BLOB = "model.enc"
GRAPH = "graph.onnx"
GRAPH_INPUTS = "graph_inputs.txt"


class PerInferenceModel(nn.Module):
    """Decrypts the weights into their buffer before each forward pass and wipes them after it."""

    def __init__(self, model: nn.Module, decryptor: GcmDecryptor):
        super().__init__()
        self.model = model
        self.decryptor = decryptor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.decryptor.decrypt()
        try:
            return self.model(x)
        finally:
            wipe_buffer(self.decryptor.buffer)


class _ParamsAsInputs(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(self.model, dict(zip(self.names, tensors)), (x,))


@protectors.register()
class AesProtector(Protector):
    """Whole-model AES-256-GCM encryption with a fresh 96-bit nonce, bound to the artifact and file name."""

    name = "aes"
    modes = ("load", "per-inference")
    secret_kind = "encrypted-weights"
    host_memory_modes = ("per-inference",)

    def _protect(self, model: nn.Module, ctx: PluginContext, key: bytes):
        weights = state_bytes(model)
        artifact = self.new_artifact(model, key, cipher="AES-256-GCM", plaintext_bytes=len(weights))
        artifact.put_encrypted(BLOB, weights, key)
        return artifact

    def _bound_model(self, artifact, key, model_factory: ModelFactory) -> tuple[nn.Module, GcmDecryptor]:
        """The model whose parameters live in a decryption buffer (decrypted now)."""
        dec = artifact.decryptor(BLOB, key)
        model = bind_views(model_factory(), safetensors_views(dec.decrypt(), f"{artifact.where}/{BLOB}"),
                           artifact.where)
        return model.eval(), dec

    def _deploy(self, artifact, key, model_factory, mode=None):
        mode = self.check_mode(mode)
        model, dec = self._bound_model(artifact, key, model_factory)
        if mode == "load":
            model._aes_buffer = dec.buffer  # keep the buffer the parameters live in alive
            return model
        wipe_buffer(dec.buffer)
        return PerInferenceModel(model, dec).eval()

    def _stolen(self, artifact, model_factory):
        return model_factory().eval()

    def _authorize(self, model, artifact, key, pruned=None):
        return None  # the secret is the weights themselves: nothing to re-apply to other weights

    def _onnx_build(self, artifact, key, model_factory, mode, example):
        if self.check_mode(mode) == "load":
            return super()._onnx_build(artifact, key, model_factory, mode, example)
        model, dec = self._bound_model(artifact, key, model_factory)
        try:
            state = model.state_dict()
            names = list(state)
            graph = onnx_runtime.export(_ParamsAsInputs(model, names), example, list(state.values()))
        finally:
            wipe_buffer(dec.buffer)
        artifact.put(GRAPH, graph)
        artifact.put(GRAPH_INPUTS, "\n".join(names).encode())

    def _onnx_load(self, artifact, key, mode, threads=1):
        if self.check_mode(mode) == "load":
            return super()._onnx_load(artifact, key, mode, threads)
        dec = artifact.decryptor(BLOB, key)
        views = safetensors_views(dec.decrypt(), f"{artifact.where}/{BLOB}")
        names = artifact.file(GRAPH_INPUTS).decode().split("\n")
        sess = onnx_runtime.session(artifact.file(GRAPH), threads)
        wanted = onnx_runtime.graph_inputs(sess)
        arrays = {f"rest_{i}": views[n].numpy() for i, n in enumerate(names) if f"rest_{i}" in wanted}
        wipe_buffer(dec.buffer)
        inner = onnx_runtime.bound(sess, arrays)

        def run(x):
            dec.decrypt()
            try:
                return inner(x)
            finally:
                wipe_buffer(dec.buffer)

        return run
