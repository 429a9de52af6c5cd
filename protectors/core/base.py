"""The protector interface, and the context the harness hands every plugin.

A protector turns a trained model into an :class:`~protectors.core.artifact.Artifact` (what is deployed on the device)
protected by a key (what the device's secure element holds). The harness never asks a protector for its name to
decide anything: it reads what the class *declares* and calls the protector's own methods.

Declarations (class attributes):

- ``secret_kind`` — what the secret is (one of :data:`SECRET_KINDS`, or a new kind of the plugin's own); attacks
  state which kinds they apply to;
- ``stolen_holds_weights`` — whether the thief's copy holds trained (if perturbed or locked) weights, so data-free
  weight inspection applies (default: true unless the secret is the encrypted weights themselves);
- ``claims_stolen_chance`` — whether the stolen copy is meant to be useless (near chance accuracy);
- ``modes`` — deploy modes; the first is the default; ``host_memory_modes`` those that cannot move to a GPU.

Methods a protector must write (abstract): ``_protect``, ``_deploy``, ``_stolen``, ``_authorize``. Everything else
has a sound default: :meth:`~Protector.secret_bytes` (the encrypted files' size), :meth:`~Protector.keyspace_bits`
(256, the AES key), ``_onnx_build`` / ``_onnx_load`` (the authorized model exported to ONNX, sealed with AES-GCM and
decrypted at load), ``_protect_for_latency`` (``_protect`` with a context that trains nothing on synthetic data),
``_compare_secret`` (nothing).

Authentication is not left to each plugin: the public entry points (``protect``, ``deploy``, ``stolen``,
``authorize``, ``compare_secret``, ``onnx_build``, ``onnx_load``) are template methods of this base class. Each keyed
one first checks that the artifact is this protector's and authenticates every file under the key, then calls the
plugin's ``_name``; ``stolen`` checks the files' hashes; ``protect``'s artifact is checked against its secret kind's
public metadata schema and sealed with the key. A class that redefines a public entry point (a mixin included) is
refused when it is defined, so the check cannot be skipped.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from . import kinds
from .artifact import Artifact
from .errors import ArtifactError, ConfigError, did_you_mean
from .model_card import card_of
from .pruning import Pruned

ModelFactory = Callable[[], nn.Module]
Step = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``run(x) -> logits`` on NumPy arrays: a model deployed on ONNX Runtime
OnnxRunner = Callable[[np.ndarray], np.ndarray]

#: the secret kind of a protector that holds no secret: the baseline of every latency ratio and table
NO_SECRET = "none"
#: secret kinds the built-in attacks know; a plugin may declare a new one (attacks that need a kind skip it)
SECRET_KINDS = {
    "none": "no secret: the thief runs what the device runs",
    "encrypted-weights": "the weights themselves are ciphertext: the thief holds none of them",
    "neuron-mask": "a multiplicative mask on some neurons at lock sites (EdgePro)",
    "neuron-sign": "a sign key on some neurons at lock sites (HPNN)",
    "weight-correction": "positions and original values of perturbed weights (NNSplitter, AdvParams)",
    "withheld-weights": "part of the weights kept in a TEE; the thief's copy has them re-initialized",
}


class Trainer(Protocol):
    """One training loop; ``step(model, x, y) -> loss`` replaces the default cross-entropy step."""

    def fit(self, model: nn.Module, loader: Iterable, epochs: int | None = None, step: Step | None = None,
            desc: str = "train", lr: float | None = None) -> nn.Module: ...

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float: ...


@dataclasses.dataclass
class PluginContext:
    """What the harness hands a protector: no need to import the harness itself.

    ``train_loader`` yields shuffled ``(x, y)`` batches; ``calib_x``/``calib_y`` is a small labeled calibration set
    from the training data; ``lock_sites`` are the model's declared default sites. ``seed`` is public (it is in the
    config): use it for initialization and shuffling. ``secret_seed`` is derived from the device key and the
    artifact's identity: use it (through :meth:`secret_rng`) for every draw that is part of the secret.
    """

    model_factory: ModelFactory
    trainer: Trainer
    train_loader: Iterable
    calib_x: torch.Tensor
    calib_y: torch.Tensor
    num_classes: int
    epochs: int
    lock_sites: tuple[str, ...]
    device: torch.device
    seed: int
    secret_seed: int
    example_input: torch.Tensor

    def secret_rng(self) -> np.random.Generator:
        return np.random.default_rng(self.secret_seed)


class NoTraining:
    """A trainer that trains nothing: latency artifacts have the right layout, their weights' values do not matter."""

    device = torch.device("cpu")

    def fit(self, model, loader, epochs=None, step=None, desc="train", lr=None):
        return model.eval()

    @torch.no_grad()
    def evaluate(self, model, x, y, batch=1000):
        model.eval()
        return float((torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]) == y)
                     .float().mean()) if len(x) else 0.0


def latency_context(model_factory: ModelFactory, example_input: torch.Tensor, num_classes: int,
                    secret_seed: int, samples: int = 64) -> PluginContext:
    """A context with synthetic data and a trainer that trains nothing: enough to build a latency-only artifact
    with the same layout as a real one, without any dataset."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *example_input.shape[1:], generator=gen)
    y = torch.randint(0, num_classes, (samples,), generator=gen)
    card = card_of(model_factory)
    return PluginContext(model_factory=model_factory, trainer=NoTraining(), train_loader=[(x, y)], calib_x=x,
                         calib_y=y, num_classes=num_classes, epochs=1,
                         lock_sites=card.lock_sites if card else (), device=torch.device("cpu"), seed=0,
                         secret_seed=secret_seed, example_input=example_input[:1])


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


#: the public entry points, fixed by this base class; a plugin writes the same names with a leading underscore
TEMPLATE_METHODS = ("protect", "protect_for_latency", "deploy", "stolen", "authorize", "compare_secret",
                    "onnx_build", "onnx_load")


class Protector(Configurable, ABC):
    """Base class of protectors: see the module docstring for what to declare and what to write."""

    kind = "protector"
    modes: ClassVar[tuple[str, ...]] = ("default",)
    secret_kind: ClassVar[str]
    stolen_holds_weights: ClassVar[bool | None] = None
    claims_stolen_chance: ClassVar[bool | None] = None
    #: modes whose weights must stay in host memory (e.g. decrypted per inference): n/a on accelerators
    host_memory_modes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The public entry points are template methods: they authenticate, then call the plugin's ``_name``. A
        # class anywhere in the hierarchy (a mixin included) that redefines one would skip the check: refused.
        for klass in cls.__mro__:
            if klass is Protector or klass is object:
                continue
            for name in TEMPLATE_METHODS:
                if name in klass.__dict__:
                    raise TypeError(f"{cls.__name__}: {klass.__name__} defines {name!r}, which the Protector base "
                                    f"class owns (it authenticates the artifact first); write _{name} instead")
        if "secret_kind" in cls.__dict__ and not isinstance(cls.secret_kind, str):
            raise TypeError(f"{cls.__name__}.secret_kind must be a string")

    def __init__(self, **params: Any):
        if not isinstance(getattr(type(self), "secret_kind", None), str):
            raise TypeError(f"protector {self.name!r} must declare secret_kind (one of {', '.join(SECRET_KINDS)}, "
                            "or a kind of its own)")
        super().__init__(**params)

    # -- declarations --------------------------------------------------------------------------------------------
    @property
    def holds_weights(self) -> bool:
        """Whether the thief's copy holds trained weights (data-free weight inspection applies)."""
        v = self.stolen_holds_weights
        return self.secret_kind != "encrypted-weights" if v is None else bool(v)

    @property
    def claims_chance(self) -> bool:
        v = self.claims_stolen_chance
        return self.secret_kind != "none" if v is None else bool(v)

    def declaration(self) -> dict[str, Any]:
        """What the protector declares, as recorded beside its results."""
        return {"secret_kind": self.secret_kind, "holds_weights": self.holds_weights,
                "claims_chance": self.claims_chance, "modes": list(self.modes)}

    # -- checks shared by every protector ------------------------------------------------------------------------
    def check_artifact(self, artifact: Artifact) -> None:
        if artifact.meta.get("protector") != self.name:
            raise ArtifactError(
                f"{artifact.where}: made by protector {artifact.meta.get('protector')!r}, not {self.name!r}"
            )

    def open(self, artifact: Artifact, key: bytes) -> None:
        """Check that ``artifact`` is this protector's and authenticate every file of it under ``key``."""
        self.check_artifact(artifact)
        artifact.verify(key)

    def check_mode(self, mode: str | None) -> str:
        mode = mode or self.modes[0]
        if mode not in self.modes:
            raise ConfigError(f"protector {self.name!r}: unknown mode {mode!r} (allowed: {', '.join(self.modes)})")
        return mode

    def new_artifact(self, model: nn.Module, key: bytes, **extra: Any) -> Artifact:
        """An empty artifact of this protector for ``model`` (public parameters and model spec in its metadata)."""
        card = card_of(model)
        spec = card.spec() if card is not None else {"class": type(model).__name__}
        return Artifact.new(self.name, self.public_params(), spec, key, **extra)

    def public_params(self) -> dict[str, Any]:
        """Parameters written in plaintext metadata (override to keep secret ones out)."""
        return self.param_dict()

    # -- the public entry points (template methods: checks first, then the plugin's own ``_name``) ---------------
    def protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        """Build the deployable artifact from a normally trained ``model``, sealed with ``key``."""
        return self._seal(self._protect(model, ctx, key), key, "_protect")

    def protect_for_latency(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        """An artifact with the same layout and sizes as :meth:`protect`, for latency only, sealed with ``key``."""
        return self._seal(self._protect_for_latency(model, ctx, key), key, "_protect_for_latency")

    def deploy(self, artifact: Artifact, key: bytes, model_factory: ModelFactory, mode: str | None = None) -> nn.Module:
        """The authorized device's model (eval mode): the artifact is authenticated under ``key`` first."""
        self.open(artifact, key)
        return self._deploy(artifact, key, model_factory, mode)

    def stolen(self, artifact: Artifact, model_factory: ModelFactory) -> nn.Module:
        """What a thief holding the artifact but not the key can run (the files' hashes are checked first)."""
        self.check_artifact(artifact)
        artifact.check_integrity()
        return self._stolen(artifact, model_factory)

    def authorize(self, model: nn.Module, artifact: Artifact, key: bytes,
                  pruned: Pruned | None = None) -> nn.Module | None:
        """The real secret applied to an attacked copy (the artifact is authenticated under ``key`` first)."""
        self.open(artifact, key)
        return self._authorize(model, artifact, key, pruned)

    def compare_secret(self, artifact: Artifact, key: bytes, guess: Any) -> dict[str, Any]:
        """How close an attacker's ``guess`` of the secret is to the real one (reporting only)."""
        self.open(artifact, key)
        return self._compare_secret(artifact, key, guess)

    def onnx_build(self, artifact: Artifact, key: bytes, model_factory: ModelFactory, mode: str,
                   example: torch.Tensor) -> None:
        """Add the files a device needs to run ``mode`` on ONNX Runtime (the harness seals the artifact again)."""
        self.open(artifact, key)
        self._onnx_build(artifact, key, model_factory, mode, example)

    def onnx_load(self, artifact: Artifact, key: bytes, mode: str, threads: int = 1) -> OnnxRunner:
        """Cold start on ONNX Runtime for the files :meth:`onnx_build` made; returns ``run(x)``."""
        self.open(artifact, key)
        return self._onnx_load(artifact, key, mode, threads)

    def _seal(self, artifact: Any, key: bytes, made_by: str) -> Artifact:
        if not isinstance(artifact, Artifact):
            raise TypeError(f"protector {self.name!r}: {made_by} must return an Artifact, got {artifact!r}")
        if artifact.meta.get("protector") != self.name:
            raise TypeError(f"protector {self.name!r}: its artifact says protector {artifact.meta.get('protector')!r}")
        try:
            kinds.check_public_meta(self.secret_kind, artifact.meta)
        except ValueError as exc:
            raise TypeError(f"protector {self.name!r}: {exc}") from None
        artifact.seal(key)
        if self.secret_kind != "none" and self.secret_bytes(artifact) <= 0:
            raise TypeError(f"protector {self.name!r} declares secret kind {self.secret_kind!r} but its artifact "
                            "holds no secret bytes (encrypt the secret with Artifact.put_encrypted, or override "
                            "secret_bytes)")
        return artifact

    # -- what every protector writes -----------------------------------------------------------------------------
    @abstractmethod
    def _protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        """Build the deployable artifact from a normally trained ``model`` (sealed by :meth:`protect`)."""

    @abstractmethod
    def _deploy(self, artifact: Artifact, key: bytes, model_factory: ModelFactory,
                mode: str | None = None) -> nn.Module:
        """The authorized device's model (eval mode), ready for inference; the artifact is authenticated."""

    @abstractmethod
    def _stolen(self, artifact: Artifact, model_factory: ModelFactory) -> nn.Module:
        """What a thief holding the artifact but not the key can run (eval mode)."""

    @abstractmethod
    def _authorize(self, model: nn.Module, artifact: Artifact, key: bytes,
                   pruned: Pruned | None = None) -> nn.Module | None:
        """Apply the secret to an attacked copy (same architecture, maybe fine-tuned or structurally pruned).

        ``pruned`` says which output channels of which modules survived structured pruning, so a per-neuron secret
        can be sliced to match (:meth:`Pruned.kept_at`). Return ``None`` only where the secret cannot be separated
        from the weights (whole-model encryption): the table then shows no ``auth_acc_after``.
        """

    # -- defaults --------------------------------------------------------------------------------------------------
    def secret_bytes(self, artifact: Artifact) -> int:
        """Bytes under encryption (what must be decrypted with the key): the artifact's encrypted files."""
        return artifact.secret_bytes

    def keyspace_bits(self, artifact: Artifact) -> float:
        """log2 of the guesses a thief needs: what ``protect`` recorded as ``keyspace_bits`` in the metadata when the
        secret itself is smaller than the key, else the 256-bit key (0 without a secret)."""
        if "keyspace_bits" in artifact.meta:
            return float(artifact.meta["keyspace_bits"])
        return 0.0 if self.secret_kind == "none" else 256.0

    def _compare_secret(self, artifact: Artifact, key: bytes, guess: Any) -> dict[str, Any]:
        return {}

    def _protect_for_latency(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        """Default: :meth:`_protect` itself, with the :func:`latency_context` the harness passes (synthetic data, a
        trainer that trains nothing). Override when protecting is slow even without training."""
        return self._protect(model, ctx, key)

    def _onnx_build(self, artifact: Artifact, key: bytes, model_factory: ModelFactory, mode: str,
                    example: torch.Tensor) -> None:
        """Default: the authorized model exported whole, encrypted with AES-GCM, decrypted at load (no cost per
        inference; the secret is exposed in memory like AES's decrypt-at-load). Raise
        :class:`~protectors.core.errors.NotApplicable` with the reason where a mode has no ONNX deployment."""
        from . import onnx_runtime

        onnx_runtime.sealed_graph(self.deploy(artifact, key, model_factory, mode), example, artifact, key)

    def _onnx_load(self, artifact: Artifact, key: bytes, mode: str, threads: int = 1) -> OnnxRunner:
        from . import onnx_runtime

        return onnx_runtime.load_sealed_graph(artifact, key, threads)


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
