"""``aes``: the whole serialized model encrypted with AES-256-GCM (the encryption baseline EdgePro is compared with).

Two deploy modes:

- ``load``: decrypt once when the model is loaded; plaintext weights then stay in memory.
- ``per-inference``: decrypt before every inference and wipe right after, so weights never stay in plaintext.

Both decrypt into one preallocated buffer whose bytes *are* the model's parameters (zero-copy safetensors views),
so no time goes to copies between bytes, NumPy and tensors. The thief holds only ciphertext: their model is the
architecture with random weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .artifact import Artifact, new_meta
from .base import ModelFactory, PluginContext, Protector
from .crypto import GcmDecryptor, encrypt, key_id, wipe_buffer
from .errors import KeyMaterialError
from .none import model_spec
from .registry_instance import protectors
from .weights import bind_views, safetensors_views, state_bytes

BLOB = "model.enc"


def check_key(artifact: Artifact, key: bytes) -> None:
    """Tell a wrong key apart from tampering, using the key id recorded in the metadata."""
    expected = artifact.meta.get("key_id")
    if expected is not None and expected != key_id(key):
        raise KeyMaterialError(f"{artifact.where}: wrong key (key id {key_id(key)}, artifact needs {expected})")


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


@protectors.register()
class AesProtector(Protector):
    """Whole-model AES-256-GCM encryption with a fresh 96-bit nonce, metadata bound as associated data."""

    name = "aes"
    modes = ("load", "per-inference")

    def protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        weights = state_bytes(model)
        meta = new_meta(self.name, self.param_dict(), model_spec(model), files=[BLOB], key_id=key_id(key),
                        cipher="AES-256-GCM", plaintext_bytes=len(weights))
        artifact = Artifact(meta)
        artifact.files[BLOB] = encrypt(key, weights, artifact.aad())
        return artifact

    def decryptor(self, artifact: Artifact, key: bytes) -> GcmDecryptor:
        self.check_artifact(artifact)
        check_key(artifact, key)
        return GcmDecryptor(key, artifact.file(BLOB), artifact.aad(), f"{artifact.where}/{BLOB}")

    def deploy(self, artifact, key, model_factory: ModelFactory, mode=None):
        mode = self.check_mode(mode)
        dec = self.decryptor(artifact, key)
        plain = dec.decrypt()
        model = bind_views(model_factory(), safetensors_views(plain, f"{artifact.where}/{BLOB}"), artifact.where)
        model.eval()
        if mode == "load":
            model._aes_buffer = dec.buffer  # keep the buffer the parameters live in alive
            return model
        wipe_buffer(dec.buffer)
        return PerInferenceModel(model, dec).eval()

    def stolen(self, artifact, model_factory):
        self.check_artifact(artifact)
        return model_factory().eval()

    def secret_bytes(self, artifact):
        return len(artifact.file(BLOB))

    def keyspace_bits(self, artifact):
        return 256.0
