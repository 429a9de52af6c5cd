"""Secret kind ``neuron-mask``: a multiplicative mask on some neurons at lock sites (EdgePro and its kin).

This module owns the kind's secret format (:class:`Password`), its public metadata schema (what a protector of this
kind discloses in plaintext, checked at ``protect``), and the helpers every protector and attack of this kind shares:
ranking neurons by activation, the roulette-wheel selection, applying a mask in the graph, slicing under pruning,
and overlap between two passwords.

Public metadata (``artifact.meta``) of a ``neuron-mask`` artifact, all optional:

- ``params.gamma`` — fraction of neurons per site that are authorization neurons (float in (0, 1]);
- ``params.pool`` — fraction of the ranking the authorization neurons are drawn from (float in (0, 1]);
- ``lock_sites`` — the sites the mask is applied at (list of module names).

A thief reads these (Kerckhoffs) through :func:`public_gamma`, :func:`public_pool` and :func:`public_sites`; when
the artifact does not disclose one, it assumes the kind's default (:data:`DEFAULT_GAMMA`, :data:`DEFAULT_POOL`, the
model's declared sites).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .. import lock
from ..errors import ArtifactError

KIND = "neuron-mask"
#: the defaults a thief assumes when the artifact does not disclose them (EdgePro's paper values)
DEFAULT_GAMMA = 0.1
DEFAULT_POOL = 0.3
DEFAULT_LOCK_VALUE = 0.0


def _fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


def check_public_meta(meta: dict[str, Any]) -> None:
    """Raise ``ValueError`` when the plaintext metadata breaks the kind's schema (called at ``protect``)."""
    params = meta.get("params", {})
    for name in ("gamma", "pool"):
        if name in params and params[name] is not None and not _fraction(params[name]):
            raise ValueError(f"public metadata 'params.{name}' of a neuron-mask artifact must be in (0, 1], "
                             f"got {params[name]!r}")
    sites = meta.get("lock_sites")
    if sites is not None and not (isinstance(sites, list) and all(isinstance(s, str) for s in sites)):
        raise ValueError("public metadata 'lock_sites' of a neuron-mask artifact must be a list of module names")


def public_gamma(meta: dict[str, Any], given: float | None = None) -> float:
    """``gamma`` as the thief knows it: given, else the artifact's public metadata, else the default."""
    return _public(meta, "gamma", given, DEFAULT_GAMMA)


def public_pool(meta: dict[str, Any], given: float | None = None) -> float:
    return _public(meta, "pool", given, DEFAULT_POOL)


def public_sites(meta: dict[str, Any], declared: Iterable[str]) -> tuple[str, ...]:
    """The lock sites as the thief knows them: the artifact's public metadata, else the model's declared ones."""
    sites = meta.get("lock_sites")
    return tuple(sites) if sites else tuple(declared)


def _public(meta: dict[str, Any], name: str, given: float | None, default: float) -> float:
    if given is not None:
        return given
    value = meta.get("params", {}).get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def neurons_per_site(width: int, gamma: float) -> int:
    """``ceil(gamma·n)`` authorization neurons (at least one) at a site of ``width`` neurons."""
    return max(1, math.ceil(gamma * width - 1e-9))


@dataclass(frozen=True)
class Password:
    """The secret: authorization neurons per site (with each site's width), locking value and scale factor."""

    neurons: dict[str, list[int]]
    widths: dict[str, int]
    lock_value: float = 0.0
    scale: float = 1.0

    def mask(self, site: str, device: torch.device | str = "cpu") -> torch.Tensor:
        m = torch.full((self.widths[site],), float(self.scale), device=device)
        m[torch.as_tensor(self.neurons[site], dtype=torch.long, device=device)] = float(self.lock_value)
        return m

    def masks(self) -> dict[str, torch.Tensor]:
        return {s: self.mask(s) for s in self.neurons}

    def to_bytes(self) -> bytes:
        return json.dumps({"neurons": self.neurons, "widths": self.widths, "lock_value": self.lock_value,
                           "scale": self.scale}, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> Password:
        try:
            d = json.loads(data)
            pw = cls({k: [int(i) for i in v] for k, v in d["neurons"].items()},
                     {k: int(v) for k, v in d["widths"].items()}, float(d["lock_value"]), float(d["scale"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ArtifactError(f"{what}: malformed password") from None
        for s, idx in pw.neurons.items():
            if s not in pw.widths or any(not 0 <= i < pw.widths[s] for i in idx):
                raise ArtifactError(f"{what}: password neuron index out of range at site {s!r}")
        return pw

    def keyspace_bits(self) -> float:
        """log2 of the number of neuron choices with the same counts per site (λ and s not counted)."""
        return float(sum(math.log2(math.comb(self.widths[s], len(i))) for s, i in self.neurons.items()))

    def sliced(self, kept: dict[str, list[int]]) -> Password:
        """The password on a structurally pruned model: ``kept[site]`` lists the surviving original indices."""
        neurons, widths = dict(self.neurons), dict(self.widths)
        for site, survivors in kept.items():
            if site in neurons:
                pos = {orig: new for new, orig in enumerate(survivors)}
                neurons[site] = [pos[i] for i in neurons[site] if i in pos]
                widths[site] = len(survivors)
        return Password(neurons, widths, self.lock_value, self.scale)

    def overlap(self, other: Password) -> dict[str, float]:
        """Per site, the fraction of this password's neurons that ``other`` also names."""
        return {s: len(set(i) & set(other.neurons.get(s, []))) / len(i) for s, i in self.neurons.items()}


def apply_password(model: nn.Module, password: Password) -> nn.Module:
    """Install the password's masks at its sites (in the graph, in place at inference)."""
    try:
        return lock.install_masks(model, password.masks())
    except KeyError as exc:
        raise ArtifactError(f"password names lock site {exc.args[0]!r}, which the model does not have") from None


@torch.no_grad()
def rank_neurons(model: nn.Module, sites: Iterable[str], calib_x: torch.Tensor,
                 batch: int = 256) -> dict[str, np.ndarray]:
    """Per site, neuron indices sorted by mean activation on ``calib_x``, highest first."""
    model = copy.deepcopy(model).eval()
    wrapped = lock.install(model, sites)
    for s in wrapped.values():
        s.record = []
    for i in range(0, len(calib_x), batch):
        model(calib_x[i : i + batch])
    ranks = {}
    for name, s in wrapped.items():
        mean = torch.stack(s.record).sum(0) / len(calib_x)
        # Stable sort so that ties keep index order and the ranking is reproducible.
        ranks[name] = np.argsort(-mean.cpu().numpy(), kind="stable")
    return ranks


def select_neurons(ranking: np.ndarray, gamma: float, pool: float, rng: np.random.Generator) -> list[int]:
    """Roulette-wheel draw, without repeats, of ``ceil(gamma·n)`` neurons from the top ``pool`` of ``ranking``."""
    n = len(ranking)
    k = neurons_per_site(n, gamma)
    size = max(k, math.ceil(pool * n - 1e-9))
    fitness = np.arange(size, 0, -1, dtype=float)  # linear in rank, all positive
    chosen = rng.choice(ranking[:size], size=k, replace=False, p=fitness / fitness.sum())
    return sorted(int(i) for i in chosen)
