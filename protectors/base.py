"""The protector interface, and the context the harness hands every plugin.

A protector turns a trained model into an :class:`~protectors.artifact.Artifact` (what is deployed on the device)
protected by a key (what the device's secure element holds). It must answer four questions for the harness:

- :meth:`Protector.protect` — build the artifact from a trained model and the plugin context;
- :meth:`Protector.deploy` — the authorized device's runnable model, built from the artifact and the key;
- :meth:`Protector.stolen` — what a thief who copied the artifact, not the key, can run;
- :meth:`Protector.secret_bytes` / :meth:`Protector.keyspace_bits` — how much is encrypted, how large the key space.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from .artifact import Artifact
from .errors import ArtifactError, ConfigError, did_you_mean

ModelFactory = Callable[[], nn.Module]
Step = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class Trainer(Protocol):
    """One training loop; ``step(model, x, y) -> loss`` replaces the default cross-entropy step."""

    def fit(self, model: nn.Module, loader: Iterable, epochs: int, step: Step | None = None,
            desc: str = "train", lr: float | None = None) -> nn.Module: ...

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float: ...


@dataclasses.dataclass
class PluginContext:
    """What the harness hands a protector or attack: no need to import the harness itself.

    ``train_loader`` yields shuffled ``(x, y)`` batches; ``calib_x`` is a small calibration set from the training
    data; ``lock_sites`` and ``fold_producers`` are the model's declared defaults (site → the layer before it
    whose weights a lock can be folded into).
    """

    model_factory: ModelFactory
    trainer: Trainer
    train_loader: Iterable
    calib_x: torch.Tensor
    num_classes: int
    epochs: int
    lock_sites: tuple[str, ...]
    fold_producers: dict[str, str]
    device: torch.device
    seed: int
    rng: np.random.Generator
    example_input: torch.Tensor


@dataclasses.dataclass(frozen=True)
class NoParams:
    pass


class Configurable:
    """A plugin with declared parameters (a dataclass ``Params``), validated at construction."""

    name: ClassVar[str]
    kind: ClassVar[str] = "plugin"
    Params: ClassVar[type] = NoParams

    def __init__(self, **params: Any):
        self.params = build_params(self.Params, params, where=f"{self.kind} {self.name!r}")

    def param_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)


class Protector(Configurable, ABC):
    """Base class of protectors. Subclasses set ``name``, ``Params`` (a dataclass) and ``modes``."""

    kind = "protector"
    modes: ClassVar[tuple[str, ...]] = ("default",)

    def check_artifact(self, artifact: Artifact) -> None:
        if artifact.meta.get("protector") != self.name:
            raise ArtifactError(
                f"{artifact.where}: made by protector {artifact.meta.get('protector')!r}, not {self.name!r}"
            )

    def check_mode(self, mode: str | None) -> str:
        mode = mode or self.modes[0]
        if mode not in self.modes:
            raise ConfigError(f"protector {self.name!r}: unknown mode {mode!r} (allowed: {', '.join(self.modes)})")
        return mode

    @abstractmethod
    def protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        """Build the deployable artifact from a normally trained ``model``."""

    @abstractmethod
    def deploy(self, artifact: Artifact, key: bytes, model_factory: ModelFactory, mode: str | None = None) -> nn.Module:
        """The authorized device's model (eval mode), ready for inference."""

    @abstractmethod
    def stolen(self, artifact: Artifact, model_factory: ModelFactory) -> nn.Module:
        """What a thief holding the artifact but not the key can run (eval mode)."""

    def authorize(self, model: nn.Module, artifact: Artifact, key: bytes,
                  kept: dict[str, list[int]] | None = None) -> nn.Module | None:
        """Apply the secret to other weights of the same architecture (e.g. a fine-tuned stolen copy).

        ``kept`` maps lock sites to the neuron indices that survived structured pruning, so a per-neuron secret can
        be sliced to match. Returns ``None`` where the secret is not separable from the weights (whole-model
        encryption).
        """
        return None

    def compare_secret(self, artifact: Artifact, key: bytes, guess: Any) -> dict[str, Any]:
        """How close an attacker's ``guess`` of the secret is to the real one (reporting only)."""
        return {}

    def protect_for_latency(self, model: nn.Module, ctx: PluginContext | None, key: bytes) -> Artifact:
        """An artifact with the same layout and sizes as :meth:`protect`, for latency only (weights untrained).

        Latency does not depend on the weights' values, so the profiler needs no dataset. Protectors whose
        :meth:`protect` trains override this to skip the training.
        """
        return self.protect(model, ctx, key)  # type: ignore[arg-type]

    def secret_bytes(self, artifact: Artifact) -> int:
        """Bytes under encryption (what must be decrypted with the key)."""
        return 0

    def keyspace_bits(self, artifact: Artifact) -> float:
        return 0.0


def build_params(cls: type, params: dict[str, Any], where: str) -> Any:
    """Build the dataclass ``cls`` from ``params``; unknown names and wrong types raise :class:`ConfigError`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in params:
        if k not in fields:
            allowed = ", ".join(fields) or "none"
            raise ConfigError(f"{where}: unknown parameter {k!r}{did_you_mean(k, fields)} (allowed: {allowed})")
    try:
        obj = cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "float" in typ and isinstance(v, int) and not isinstance(v, bool):
            object.__setattr__(obj, f.name, float(v))
            v = float(v)
        ok = {"int": isinstance(v, int) and not isinstance(v, bool), "float": isinstance(v, float),
              "str": isinstance(v, str), "bool": isinstance(v, bool)}.get(typ.split(" |")[0], True)
        if v is None and "None" in typ:
            ok = True
        if not ok:
            raise ConfigError(f"{where}: parameter {f.name!r} must be {typ}, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}: parameter {f.name!r} must be finite, got {v!r}")
    validate = getattr(obj, "validate", None)
    if validate:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return obj
