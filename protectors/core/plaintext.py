"""Protectors whose artifact is the model's weights in plaintext plus one secret encrypted under the key.

EdgePro, HPNN, NNSplitter, shield and AdvParams all deploy the same way: the weights the thief copies
(:data:`~protectors.core.weights.WEIGHTS`, locked, key-trained, perturbed or with parts withheld) and a small secret
(a password, a sign key, a weight patch) that only the key decrypts. :class:`PlaintextWeightsProtector` writes that
artifact and reads the secret back, so a protector of this shape writes only what differs: how to make the weights
and the secret, how to parse the secret (``parse_secret``), and how to apply it.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from .artifact import Artifact
from .base import ModelFactory, Protector
from .errors import ArtifactError
from .weights import WEIGHTS, load_weights, state_bytes

#: how the secret file is encrypted (written in the artifact's plaintext metadata as ``cipher``)
CIPHER = "AES-256-GCM"


class PlaintextWeightsProtector(Protector):
    """A protector whose thief's copy is the plaintext weights file and whose secret is one encrypted file.

    Declare ``secret_file`` (the encrypted file's name) and write :meth:`parse_secret`; build the artifact in
    ``_protect`` with :meth:`plaintext_artifact` and read the secret with :meth:`secret` (which authenticates the
    artifact first). ``_stolen`` is written: the plaintext weights, as stored.
    """

    secret_file: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "secret_file" in cls.__dict__ and not isinstance(cls.secret_file, str):
            raise TypeError(f"{cls.__name__}.secret_file must be a file name (a string)")

    def __init__(self, **params: Any):
        if not isinstance(getattr(type(self), "secret_file", None), str):
            raise TypeError(f"protector {self.name!r} must declare secret_file, the name of its encrypted secret")
        super().__init__(**params)

    # -- writing the artifact ----------------------------------------------------------------------------------------
    def plaintext_artifact(self, model: nn.Module, key: bytes, secret: bytes, weights: nn.Module | None = None,
                           **meta: Any) -> Artifact:
        """A new artifact of ``model`` (its card gives the model spec) holding ``weights`` (default: ``model``) in
        plaintext and ``secret`` encrypted with AES-256-GCM under ``key``; ``meta`` goes in the plaintext metadata
        (the thief reads it: counts and totals, never the secret)."""
        artifact = self.new_artifact(model, key, cipher=CIPHER, **meta)
        artifact.put(WEIGHTS, state_bytes(model if weights is None else weights))
        artifact.put_encrypted(self.secret_file, secret, key)
        return artifact

    # -- reading it back ---------------------------------------------------------------------------------------------
    def secret(self, artifact: Artifact, key: bytes) -> Any:
        """Authenticate the artifact under ``key`` (a no-op when already done), then decrypt and parse the secret."""
        self.open(artifact, key)
        name = self.secret_file
        return self.parse_secret(artifact.decrypt(name, key), f"{artifact.where}/{name}")

    @abstractmethod
    def parse_secret(self, data: bytes, where: str) -> Any:
        """The secret from its decrypted bytes; raise :class:`~protectors.core.errors.ArtifactError` naming
        ``where`` (the file) when they are malformed."""

    def plaintext_model(self, artifact: Artifact, model_factory: ModelFactory) -> nn.Module:
        """The model with the plaintext weights loaded (eval mode): what the thief runs, and where the device
        starts from."""
        return load_weights(artifact, model_factory)

    def plaintext_state(self, artifact: Artifact) -> dict[str, torch.Tensor]:
        """The plaintext weights as a state dict (name → tensor), without building a model."""
        what = f"{artifact.where}/{WEIGHTS}"
        try:
            return st_load(bytes(artifact.file(WEIGHTS)))
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ArtifactError(f"{what}: not a readable safetensors file ({exc})") from None

    def _stolen(self, artifact: Artifact, model_factory: ModelFactory) -> nn.Module:
        return self.plaintext_model(artifact, model_factory)
