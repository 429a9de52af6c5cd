"""Secret kind ``neuron-sign``: a sign key on some neurons at lock sites (HPNN and its kin).

This module owns the kind's secret format (:class:`SignKey`), its public metadata schema and the helpers protectors
and attacks of this kind share: drawing a key, applying it in the graph, slicing under pruning, agreement of a guess.

Public metadata (``artifact.meta``) of a ``neuron-sign`` artifact, all optional:

- ``key_bits`` (or ``params.key_bits``) — K, the number of locked neurons (int ≥ 1);
- ``lock_sites`` (or ``params.sites``) — the sites the key is applied at (list of module names).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .. import lock
from ..errors import ArtifactError

KIND = "neuron-sign"
#: the K a thief assumes when the artifact does not disclose it
DEFAULT_KEY_BITS = 64


def check_public_meta(meta: dict[str, Any]) -> None:
    """Raise ``ValueError`` when the plaintext metadata breaks the kind's schema (called at ``protect``)."""
    k = meta.get("key_bits", meta.get("params", {}).get("key_bits"))
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"public metadata 'key_bits' of a neuron-sign artifact must be an int >= 1, got {k!r}")
    sites = meta.get("lock_sites") or meta.get("params", {}).get("sites")
    if sites is not None and not (isinstance(sites, list) and all(isinstance(s, str) for s in sites)):
        raise ValueError("public metadata 'lock_sites' of a neuron-sign artifact must be a list of module names")


def public_sites(meta: dict[str, Any], declared: Iterable[str]) -> tuple[str, ...]:
    """The lock sites as the thief knows them: the artifact's public metadata, else the model's declared ones."""
    sites = meta.get("lock_sites") or meta.get("params", {}).get("sites")
    return tuple(sites) if sites else tuple(declared)


def public_key_bits(meta: dict[str, Any], given: int | None, n: int, default: int = DEFAULT_KEY_BITS) -> int:
    """K as the thief knows it: given, else the artifact's public metadata, else the default; at most ``n``."""
    if given is None:
        given = meta.get("key_bits", meta.get("params", {}).get("key_bits"))
    return min(int(given) if isinstance(given, int) else default, n)


@dataclass(frozen=True)
class SignKey:
    """Locked neurons per site with their key bits (aligned lists), and each site's width.

    A thief's guess is a key too: :meth:`from_flips` names the neurons it flips, each with bit 1.
    """

    neurons: dict[str, list[int]]
    bits: dict[str, list[int]]
    widths: dict[str, int]

    @classmethod
    def from_flips(cls, flips: dict[str, list[int]], widths: dict[str, int]) -> SignKey:
        flips = {s: sorted(int(i) for i in flips.get(s, [])) for s in widths}
        return cls(flips, {s: [1] * len(i) for s, i in flips.items()}, dict(widths))

    @property
    def size(self) -> int:
        """K: the number of locked neurons."""
        return sum(len(i) for i in self.neurons.values())

    def flipped(self) -> dict[str, set[int]]:
        """Per site, the neurons whose sign the key flips (bit 1)."""
        return {s: {i for i, b in zip(idx, self.bits[s]) if b} for s, idx in self.neurons.items()}

    def mask(self, site: str, device: torch.device | str = "cpu") -> torch.Tensor:
        m = torch.ones(self.widths[site], device=device)
        flips = sorted(self.flipped().get(site, ()))
        if flips:
            m[torch.as_tensor(flips, dtype=torch.long, device=device)] = -1.0
        return m

    def masks(self) -> dict[str, torch.Tensor]:
        return {s: self.mask(s) for s in self.widths}

    def to_bytes(self) -> bytes:
        return json.dumps({"neurons": self.neurons, "bits": self.bits, "widths": self.widths},
                          sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, what: str) -> SignKey:
        try:
            d = json.loads(data)
            key = cls({s: [int(i) for i in v] for s, v in d["neurons"].items()},
                      {s: [int(b) for b in v] for s, v in d["bits"].items()},
                      {s: int(w) for s, w in d["widths"].items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ArtifactError(f"{what}: malformed key") from None
        for s, idx in key.neurons.items():
            if (s not in key.widths or len(key.bits.get(s, ())) != len(idx)
                    or any(not 0 <= i < key.widths[s] for i in idx) or any(b not in (0, 1) for b in key.bits[s])):
                raise ArtifactError(f"{what}: key out of range at site {s!r}")
        return key

    def sliced(self, kept: dict[str, list[int]]) -> SignKey:
        """The key on a structurally pruned model: ``kept[site]`` lists the surviving original indices."""
        neurons, bits, widths = dict(self.neurons), dict(self.bits), dict(self.widths)
        for site, survivors in kept.items():
            if site in neurons:
                pos = {orig: new for new, orig in enumerate(survivors)}
                pairs = [(pos[i], b) for i, b in zip(neurons[site], bits[site]) if i in pos]
                neurons[site], bits[site] = [i for i, _ in pairs], [b for _, b in pairs]
                widths[site] = len(survivors)
        return SignKey(neurons, bits, widths)

    def agreement(self, guess: SignKey) -> dict[str, float]:
        """How close ``guess`` is: ``bit_accuracy`` — fraction of this key's K neurons whose sign the guess sets
        right; ``flip_recall`` / ``flip_precision`` — of the flipped sets; ``sign_agreement`` — over all N neurons."""
        mine, theirs = self.flipped(), guess.flipped()
        right = sum((i in theirs.get(s, set())) == bool(b)
                    for s, idx in self.neurons.items() for i, b in zip(idx, self.bits[s]))
        n_mine = sum(len(v) for v in mine.values())
        n_theirs = sum(len(theirs.get(s, set())) for s in self.widths)
        hit = sum(len(v & theirs.get(s, set())) for s, v in mine.items())
        wrong = sum(len(v ^ theirs.get(s, set())) for s, v in mine.items())
        n = sum(self.widths.values())
        return {"bit_accuracy": right / max(1, self.size), "flip_recall": hit / n_mine if n_mine else 1.0,
                "flip_precision": hit / n_theirs if n_theirs else 1.0, "sign_agreement": 1 - wrong / max(1, n)}


def keyspace(n: int, k: int) -> tuple[float, float]:
    """``(effective, nominal)`` log2 keyspace of K locked neurons among N: distinct sign masks, and positions+bits."""
    return math.log2(sum(math.comb(n, j) for j in range(k + 1))), math.log2(math.comb(n, k)) + k


def draw_key(widths: dict[str, int], k: int, rng: np.random.Generator) -> SignKey:
    """K neurons uniformly without repeats across all sites, one uniform bit each."""
    pairs = [(s, i) for s, w in widths.items() for i in range(w)]
    chosen = rng.choice(len(pairs), size=min(k, len(pairs)), replace=False)
    bits = rng.integers(0, 2, size=len(chosen))
    by_site: dict[str, list[tuple[int, int]]] = {s: [] for s in widths}
    for c, b in zip(chosen, bits):
        s, i = pairs[int(c)]
        by_site[s].append((i, int(b)))
    for v in by_site.values():
        v.sort()
    return SignKey({s: [i for i, _ in v] for s, v in by_site.items()},
                   {s: [b for _, b in v] for s, v in by_site.items()}, dict(widths))


def apply_key(model: nn.Module, key: SignKey) -> nn.Module:
    """Install the key's sign masks at its sites (:class:`~protectors.core.lock.LockedSite`, differentiable)."""
    try:
        return lock.install_masks(model, key.masks())
    except KeyError as exc:
        raise ArtifactError(f"key names lock site {exc.args[0]!r}, which the model does not have") from None
