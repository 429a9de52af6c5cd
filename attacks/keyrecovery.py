"""Key-recovery attacks on sign-locked models (HPNN): random keys, greedy flipping, and sign learning.

The thief knows the method (Kerckhoffs), K (the artifact's public ``key_bits``) and the lock sites (the artifact's
public ``lock_sites``, else the model's declared ones), so N, the number of neurons there; it does not know which
neurons are locked nor their bits. What matters to the thief is only the set of *flipped* neurons (bit 1): at most
K of the N. Every attack scores candidate keys on the thief's labeled data (a class-stratified fraction of the
training set) with the stolen weights frozen, and returns the stolen copy with its best key applied in the graph.

- ``key-guess-random`` — N uniformly random keys (K positions, K bits), the best on the thief's data.
- ``key-recovery-greedy`` — start from no flips; in each pass try toggling every neuron's sign, most promising
  first (ranked by the gradient of the thief's loss with respect to the neuron's sign), and keep a toggle when the
  thief's loss drops; at most K flips, stop after a pass without improvement or ``max_evals`` evaluations. This is a
  plain greedy search in the spirit of the key-by-key I/O attacks on logic-locked DNNs (Li et al., DAC 2024), not
  their algorithm.
- ``sign-learning`` — mask learning relaxed to signs: ``s_i = tanh(θ_i)`` in [-1, 1] per neuron, ``θ`` starting at
  +2 (no flip), learned by Adam on the thief's data with the weights frozen; the (at most K) most negative ``s_i < 0``
  are the flips.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protectors.core import lock
from protectors.core.kinds import neuron_sign
from protectors.core.kinds.neuron_sign import SignKey, apply_key, draw_key
from protectors.core.seeding import stream_seed

from .base import Attack, Loot, Outcome, ThiefContext
from .finetune import check_fractions
from .guess import ScoredGuesses, guess_stats
from .registry_instance import attacks

#: evaluation batch for scoring keys on the thief's data
SCORE_BATCH = 2000


class _Signs:
    """Per-neuron sign multipliers at the lock sites of a frozen model copy (forward hooks: the thief's tool only)."""

    def __init__(self, model: nn.Module, values: dict[str, torch.Tensor], transform=None):
        self.values, self.transform = values, transform or (lambda t: t)
        self.handles = [model.get_submodule(s).register_forward_hook(
            lambda m, i, o, s=s: o * lock.channel_view(self.transform(self.values[s]), o)) for s in values]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _frozen(stolen: nn.Module, device: torch.device) -> nn.Module:
    model = copy.deepcopy(stolen).to(device).eval()  # eval: batch-norm statistics stay frozen too
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def _loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    loss, correct = 0.0, 0
    for i in range(0, len(x), SCORE_BATCH):
        out = model(x[i : i + SCORE_BATCH])
        loss += F.cross_entropy(out, y[i : i + SCORE_BATCH], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + SCORE_BATCH]).sum().item()
    return loss / max(1, len(x)), correct / max(1, len(x))


def _device(ctx: ThiefContext) -> torch.device:
    return torch.device(getattr(ctx.trainer, "device", "cpu"))


class _Setup(NamedTuple):
    """What every key attack starts from: the stolen copy, a frozen copy on the device, the thief's data, the sites'
    widths and the number of locked neurons K the thief assumes."""

    dev: torch.device
    stolen: nn.Module
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    widths: dict[str, int]
    k: int


def _setup(loot: Loot, ctx: ThiefContext, fraction: float, key_bits: int | None) -> _Setup:
    dev = _device(ctx)
    stolen = loot.stolen_model()
    x, y = ctx.thief_data(fraction, ctx.seed)
    widths = lock.site_widths(stolen, neuron_sign.public_sites(loot.artifact.meta, ctx.lock_sites), x[:1])
    k = neuron_sign.public_key_bits(loot.artifact.meta, key_bits, sum(widths.values()))
    return _Setup(dev, stolen, _frozen(stolen, dev), x, y, widths, k)


def _result(stolen: nn.Module, guess: SignKey) -> nn.Module:
    return apply_key(copy.deepcopy(stolen), guess).eval()


@dataclass(frozen=True)
class KeyGuessParams:
    guesses: int = 200
    fraction: float = 0.05
    #: ``None``: the artifact's public ``key_bits``
    key_bits: int | None = None

    def validate(self) -> None:
        if self.guesses < 1:
            raise ValueError("parameter 'guesses' must be >= 1")
        check_fractions([self.fraction])
        if self.key_bits is not None and self.key_bits < 1:
            raise ValueError(f"parameter 'key_bits' must be >= 1, got {self.key_bits}")


@attacks.register()
class KeyGuessRandom(ScoredGuesses, Attack):
    """N random keys (K positions across the sites, K bits); the one that scores best on the thief's data."""

    name = "key-guess-random"
    Params = KeyGuessParams
    secret_kinds = ("neuron-sign",)

    def cells(self) -> list[str]:
        return [f"N={self.params.guesses}"]

    @torch.no_grad()
    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        p = self.params
        dev, stolen, model, x, y, widths, k = _setup(loot, ctx, p.fraction, p.key_bits)
        x, y = x.to(dev), y.to(dev)
        rng = np.random.default_rng(stream_seed(ctx.seed, "thief/key-guesses"))
        signs = _Signs(model, {s: torch.ones(w, device=dev) for s, w in widths.items()})
        scores = []
        for _ in range(p.guesses):
            guess = draw_key(widths, k, rng)
            signs.values.update({s: m.to(dev) for s, m in guess.masks().items()})
            loss, acc = _loss_acc(model, x, y)
            scores.append((acc, -loss, guess))
        signs.remove()
        accs = np.array([s[0] for s in scores])
        best = max(scores, key=lambda s: (s[0], s[1]))
        extra = {"key_bits": k, **guess_stats(accs, len(y))}
        return Outcome(cell, _result(stolen, best[2]), (p.fraction, 0), extra=extra, guess=best[2], val_acc=best[0])


@dataclass(frozen=True)
class GreedyParams:
    fraction: float = 0.05
    key_bits: int | None = None
    #: passes over all neurons (a pass without an accepted toggle ends the search)
    passes: int = 10
    #: cap on evaluations of the thief's loss (one per tried toggle, each a forward pass over the thief's data)
    max_evals: int = 2000
    #: a toggle is kept when the thief's mean loss drops by more than this
    tol: float = 1e-4

    def validate(self) -> None:
        check_fractions([self.fraction])
        if self.key_bits is not None and self.key_bits < 1:
            raise ValueError(f"parameter 'key_bits' must be >= 1, got {self.key_bits}")
        if self.passes < 1 or self.max_evals < 1:
            raise ValueError("parameters 'passes' and 'max_evals' must be >= 1")
        if self.tol < 0:
            raise ValueError("parameter 'tol' must be >= 0")


@attacks.register()
class KeyRecoveryGreedy(Attack):
    """Greedy sign toggling on the thief's data, most promising neuron first; see the module docstring."""

    name = "key-recovery-greedy"
    Params = GreedyParams
    secret_kinds = ("neuron-sign",)

    def cells(self) -> list[str]:
        return [f"f={self.params.fraction:g}"]

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        p = self.params
        dev, stolen, model, x, y, widths, k = _setup(loot, ctx, p.fraction, p.key_bits)
        x, y = x.to(dev), y.to(dev)
        masks = {s: torch.ones(w, device=dev) for s, w in widths.items()}
        signs = _Signs(model, masks)
        with torch.no_grad():
            best, start_acc = _loss_acc(model, x, y)
        start_loss, evals, flips, passes = best, 0, 0, 0
        while passes < p.passes:
            passes += 1
            # First-order estimate of each toggle's effect: d(loss)/d(s_i) · (-2 s_i); try the best first.
            for m in masks.values():
                m.requires_grad_(True)
                m.grad = None
            F.cross_entropy(model(x[:SCORE_BATCH]), y[:SCORE_BATCH]).backward()
            gain = torch.cat([(m.grad * m).detach() for m in masks.values()])
            for m in masks.values():
                m.requires_grad_(False)
            where = [(s, i) for s, w in widths.items() for i in range(w)]
            improved = False
            with torch.no_grad():
                for j in torch.argsort(gain, descending=True, stable=True).tolist():
                    if evals >= p.max_evals:
                        break
                    s, i = where[j]
                    adding = bool(masks[s][i] > 0)
                    if adding and flips >= k:
                        continue
                    masks[s][i] *= -1
                    loss, _ = _loss_acc(model, x, y)
                    evals += 1
                    if loss < best - p.tol:
                        best, improved = loss, True
                        flips += 1 if adding else -1
                    else:
                        masks[s][i] *= -1
            if not improved or evals >= p.max_evals:
                break
        signs.remove()
        guess = SignKey.from_flips({s: (m < 0).nonzero().flatten().tolist() for s, m in masks.items()}, widths)
        with torch.no_grad():
            end_acc = _loss_acc(_result(stolen, guess).to(dev), x, y)[1]
        extra = {"key_bits": k, "flips": flips, "evals": evals, "passes": passes, "thief_loss_before": start_loss,
                 "thief_loss_after": best, "thief_acc_before": start_acc, "thief_acc_after": end_acc}
        return Outcome(cell, _result(stolen, guess), (p.fraction, 0), extra=extra, guess=guess, val_acc=end_acc)


@dataclass(frozen=True)
class SignLearningParams:
    fraction: float = 0.05
    epochs: int = 20
    lr: float = 0.1
    #: θ's start: s = tanh(θ) ≈ +1 (no neuron flipped)
    init: float = 2.0
    key_bits: int | None = None

    def validate(self) -> None:
        check_fractions([self.fraction])
        if self.epochs < 1 or self.lr <= 0:
            raise ValueError("parameters 'epochs' must be >= 1 and 'lr' > 0")
        if self.key_bits is not None and self.key_bits < 1:
            raise ValueError(f"parameter 'key_bits' must be >= 1, got {self.key_bits}")


@attacks.register()
class SignLearning(Attack):
    """Learn a relaxed sign ``tanh(θ_i)`` per neuron with the weights frozen; the most negative (≤ K) are flipped."""

    name = "sign-learning"
    Params = SignLearningParams
    secret_kinds = ("neuron-sign",)

    def cells(self) -> list[str]:
        return [f"f={self.params.fraction:g}"]

    def run(self, loot: Loot, ctx: ThiefContext, cell: str) -> Outcome:
        p = self.params
        dev, stolen, model, x, y, widths, k = _setup(loot, ctx, p.fraction, p.key_bits)
        theta = {s: torch.full((w,), p.init, device=dev, requires_grad=True) for s, w in widths.items()}
        signs = _Signs(model, theta, torch.tanh)
        opt = torch.optim.Adam(list(theta.values()), lr=p.lr)
        for _ in range(p.epochs):
            for xb, yb in ctx.loader(x, y, ctx.seed):
                loss = F.cross_entropy(model(xb.to(dev)), yb.to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        signs.remove()
        names = [(s, i) for s, w in widths.items() for i in range(w)]
        s_all = torch.tanh(torch.cat([t.detach() for t in theta.values()])).cpu()
        order = [j for j in torch.argsort(s_all, stable=True).tolist()[:k] if s_all[j] < 0]
        flips: dict[str, list[int]] = {}
        for j in order:
            flips.setdefault(names[j][0], []).append(names[j][1])
        guess = SignKey.from_flips(flips, widths)
        extra = {"key_bits": k, "flips": len(order), "negative": int((s_all < 0).sum()),
                 "undecided": int((s_all.abs() < 0.5).sum())}
        result = _result(stolen, guess)
        with torch.no_grad():
            val = _loss_acc(result.to(dev), x.to(dev), y.to(dev))[1]
        return Outcome(cell, result, (p.fraction, p.epochs), extra=extra, guess=guess, val_acc=val)
