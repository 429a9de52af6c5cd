"""``edgepro``: neuron authorization (Chen et al., EdgePro, arXiv 2303.12397), without the public code's defects.

The *password* is, per lock site, a set of authorization neurons, plus the locking value λ and the scale factor s.
Applying it multiplies the authorization neurons' activations by λ and every other neuron at the site by s
(s = 1 by default, which is the paper's method). A model lock-trained with the password works only when it is
applied.

1. **Ranking** — mean activation of every neuron of each site over a calibration set, through the normally trained
   model (a conv neuron is a channel: mean over all its positions; every index can be chosen).
2. **Selection** — candidate pool = the top ``pool`` (30%) of the ranking; roulette-wheel draw without repeats of
   ``ceil(gamma·n)`` neurons, fitness decreasing linearly with rank.
3. **Lock training** from scratch: in every batch a ``locked_fraction`` of the samples is *locked* (password applied,
   true labels) and the rest *released* (no mask, uniformly random labels). Masks are per-sample tensors.
4. **Artifact** — plaintext weights plus the password encrypted with AES-256-GCM; every file is authenticated
   by the key (see :mod:`protectors.core.artifact`), so swapped or tampered weights are detected.

The password's draw is seeded from the device key (``ctx.secret_rng()``), never from the public config seed:
whoever holds the config and the clean model cannot recompute it.

Deploy modes: ``mask`` multiplies inside the graph, in place (one ``Mul`` per site in ONNX, where the mask is an
initializer supplied at load); ``fold`` scales the producing layer's weights once at load (zero cost per inference;
only for sites whose model declares a foldable producer, and λ, s ≥ 0). On ONNX Runtime, ``mask`` supplies the
decrypted masks at session creation as in-memory initializers, constants from then on (the password is never in the
ONNX file), and ``fold`` overrides the producers' initializers at load.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .core import lock, onnx_runtime
from .core.artifact import Artifact
from .core.base import PluginContext
from .core.errors import ArtifactError, ConfigError, NotApplicable
from .core.kinds.neuron_mask import Password, apply_password, rank_neurons, select_neurons
from .core.model_card import card_of
from .core.plaintext import PlaintextWeightsProtector
from .core.registry_instance import protectors
from .core.seeding import torch_generator
from .core.weights import WEIGHTS

BLOB = "password.enc"
ONNX = onnx_runtime.MASKED
FOLD_PRODUCERS = "fold_producers.json"
#: parameters that are part of the password, so never written to the plaintext metadata.
SECRET_PARAMS = ("lock_value", "scale", "sites")


@dataclass(frozen=True)
class EdgeProParams:
    gamma: float = 0.1
    pool: float = 0.3
    lock_value: float = 0.0
    scale: float = 1.0
    locked_fraction: float = 0.5
    sites: list | None = None
    epochs: int | None = None
    calib_samples: int = 200

    def validate(self) -> None:
        if not 0 < self.gamma <= 1:
            raise ValueError(f"parameter 'gamma' must be in (0, 1], got {self.gamma}")
        if not 0 < self.pool <= 1:
            raise ValueError(f"parameter 'pool' must be in (0, 1], got {self.pool}")
        if not 0 < self.locked_fraction < 1:
            raise ValueError(f"parameter 'locked_fraction' must be in (0, 1), got {self.locked_fraction}")
        if self.sites is not None and (not self.sites or not all(isinstance(s, str) for s in self.sites)):
            raise ValueError("parameter 'sites' must be a non-empty list of module names")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"parameter 'epochs' must be >= 1, got {self.epochs}")
        if self.calib_samples < 1:
            raise ValueError(f"parameter 'calib_samples' must be >= 1, got {self.calib_samples}")


def lock_step(sites: dict[str, lock.LockedSite], password: Password, num_classes: int, fraction: float,
              generator: torch.Generator):
    """EdgePro's training step: lock a fraction of each batch (true labels), release the rest (random labels)."""
    masks = {n: password.mask(n) for n in sites}

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        locked = torch.zeros(b, dtype=torch.bool)
        locked[torch.randperm(b, generator=generator)[: round(fraction * b)]] = True
        locked = locked.to(x.device)
        for name, site in sites.items():
            m = masks[name].to(x.device)
            site.batch_mask = torch.where(locked[:, None], m[None, :], torch.ones_like(m)[None, :])
        random_y = torch.randint(0, num_classes, (b,), generator=generator).to(y.device)
        try:
            return F.cross_entropy(model(x), torch.where(locked, y, random_y))
        finally:
            for site in sites.values():
                site.batch_mask = None

    return step


def fold_masks(password: Password, producers: dict[str, str]) -> dict[str, torch.Tensor]:
    """Producer layer name → the mask to fold into its output neurons (exact for ReLU/max-pool paths, mask ≥ 0)."""
    out = {}
    for site in password.neurons:
        if site not in producers:
            raise NotApplicable(f"edgepro fold mode: site {site!r} has no foldable producer in this model")
        m = password.mask(site)
        if (m < 0).any():
            raise NotApplicable("edgepro fold mode needs lock_value >= 0 and scale >= 0")
        out[producers[site]] = m
    return out


@torch.no_grad()
def fold_password(model: nn.Module, password: Password, producers: dict[str, str]) -> nn.Module:
    """Scale each site's producing layer per output neuron by the mask."""
    for name, m in fold_masks(password, producers).items():
        layer = model.get_submodule(name)
        layer.weight.mul_(m.view(-1, *([1] * (layer.weight.dim() - 1))))
        if getattr(layer, "bias", None) is not None:
            layer.bias.mul_(m)
    return model


def producers_of(model_factory) -> dict[str, str]:
    """The model card's foldable producers (site → layer); none for a model without a card."""
    card = card_of(model_factory)
    return card.producers if card is not None else {}


@protectors.register()
class EdgeProProtector(PlaintextWeightsProtector):
    """EdgePro neuron authorization; see the module docstring."""

    name = "edgepro"
    Params = EdgeProParams
    modes = ("mask", "fold")
    secret_kind = "neuron-mask"
    secret_file = BLOB

    def public_params(self):
        return {k: v for k, v in self.param_dict().items() if k not in SECRET_PARAMS}

    def choose_password(self, model: nn.Module, ctx: PluginContext) -> Password:
        p = self.params
        sites = tuple(p.sites) if p.sites is not None else tuple(ctx.lock_sites)
        missing = [s for s in sites if s not in dict(model.named_modules())]
        if missing:
            raise ConfigError(f"protector 'edgepro': parameter 'sites' names {missing[0]!r}, not a module of the model")
        ranks = rank_neurons(model, sites, ctx.calib_x[: p.calib_samples])
        rng = ctx.secret_rng()  # from the key: the public seed must not reproduce the password
        neurons = {s: select_neurons(ranks[s], p.gamma, p.pool, rng) for s in sites}
        return Password(neurons, {s: len(r) for s, r in ranks.items()}, p.lock_value, p.scale)

    def lock_train(self, password: Password, ctx: PluginContext) -> nn.Module:
        torch.manual_seed(ctx.seed)
        model = ctx.model_factory().to(ctx.device)
        sites = lock.install(model, password.neurons)
        gen = torch_generator(ctx.secret_seed % 2**63)  # which samples are locked also tells the password apart
        step = lock_step(sites, password, ctx.num_classes, self.params.locked_fraction, gen)
        ctx.trainer.fit(model, ctx.train_loader, self.params.epochs or ctx.epochs, step=step, desc="edgepro lock")
        return lock.remove(model).cpu().eval()

    def _protect(self, model: nn.Module, ctx: PluginContext, key: bytes) -> Artifact:
        password = self.choose_password(model, ctx)
        locked = self.lock_train(password, ctx)
        return self.plaintext_artifact(locked, key, password.to_bytes(), keyspace_bits=password.keyspace_bits())

    def parse_secret(self, data: bytes, where: str) -> Password:
        return Password.from_bytes(data, where)

    def password(self, artifact: Artifact, key: bytes) -> Password:
        """Authenticate the artifact, then decrypt the password (:meth:`secret`)."""
        return self.secret(artifact, key)

    def _deploy(self, artifact, key, model_factory, mode=None):
        mode = self.check_mode(mode)
        password = self.secret(artifact, key)
        model = self.plaintext_model(artifact, model_factory)
        if mode == "fold":
            return fold_password(model, password, producers_of(model_factory))
        try:
            return lock.install_fixed(model, password.masks()).eval()
        except KeyError as exc:
            raise ArtifactError(f"{artifact.where}: password names lock site {exc.args[0]!r}, "
                                "which the model does not have") from None

    def _authorize(self, model, artifact, key, pruned=None):
        password = self.secret(artifact, key)
        if pruned is not None:
            password = password.sliced(pruned.kept_at(model, list(password.neurons)))
        return apply_password(copy.deepcopy(model), password).eval()

    def _compare_secret(self, artifact, key, guess):
        if not isinstance(guess, Password):
            return {}
        overlap = self.secret(artifact, key).overlap(guess)
        return {"overlap": overlap, "overlap_mean": float(np.mean(list(overlap.values())))}

    # -- ONNX Runtime ------------------------------------------------------------------------------------------
    def _onnx_build(self, artifact, key, model_factory, mode, example):
        mode = self.check_mode(mode)
        if mode == "fold":
            model = self.plaintext_model(artifact, model_factory)
            producers = producers_of(model_factory)
            fold_masks(self.secret(artifact, key), producers)  # foldable at all?
            artifact.put(ONNX, onnx_runtime.export(model, example))
            artifact.put(FOLD_PRODUCERS, json.dumps(producers).encode())
            return
        onnx_runtime.put_masked_graph(artifact, self.deploy(artifact, key, model_factory, "mask"), example)

    def _onnx_load(self, artifact, key, mode, threads=1):
        mode = self.check_mode(mode)
        password = self.secret(artifact, key)
        if mode == "fold":
            # Fold at load: the producers' weights, scaled by the password's masks, override the ONNX initializers.
            from safetensors.numpy import load as np_load

            masks = fold_masks(password, json.loads(artifact.file(FOLD_PRODUCERS)))
            weights = np_load(artifact.file(WEIGHTS))
            folded = {}
            for producer, mask in masks.items():
                for suffix in ("weight", "bias"):
                    w = weights.get(f"{producer}.{suffix}")
                    if w is not None:
                        folded[f"{producer}.{suffix}"] = np.ascontiguousarray(
                            w * mask.numpy().reshape(-1, *([1] * (w.ndim - 1))))
            graph = onnx_runtime.replace_initializers(artifact.file(ONNX), folded)
            return onnx_runtime.bound(onnx_runtime.session(graph, threads))
        return onnx_runtime.load_masked_graph(artifact, password.mask, threads)
